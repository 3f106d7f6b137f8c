//! The NATS coherence bus, end to end: several in-process proxies in front of
//! one Redis, sharing one nats-server (DESIGN.md, "Coherence invariants").
//!
//! "Served from L1" / "went upstream" is always proved with Redis's own
//! `INFO commandstats` after `CONFIG RESETSTAT`, never with timing. Waiting for
//! the bus is a bounded poll of `PROXY STATS` (its `bus` map); sleeps appear
//! only to let `max_staleness` or `peer_timeout` elapse, with a generous
//! margin.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use nearcache::Config;
use nearcache::coherence::message::{Kind, Message};
use nearcache::config::{Duration as Dur, LossPolicy, RuleConfig};
use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, Value};
use tokio::time::Instant;

use crate::compat::Raw;
use crate::support::{
    BUS_LOST, GAP, NatsServer, PEER_SILENT, RedisServer, TcpRelay, TestProxy,
    UPSTREAM_CONNECT_FAILED, UPSTREAM_LOST, config_for, pairs, proxy_stats, text, tls_certificates,
};

/// How long a bounded poll may wait for a proxy (or the bus) to reach a state.
const POLL_LIMIT: Duration = Duration::from_secs(10);

/// The documented staleness bound while the bus is healthy.
const STALENESS_BOUND: Duration = Duration::from_millis(100);

// ------------------------------------------------------------------ helpers

/// A caching rule for `prefix` (no negative caching, 1 MiB values).
fn rule(prefix: &str, ttl: Duration) -> RuleConfig {
    RuleConfig::caching(prefix, ttl)
}

/// `SET key value` straight on Redis (not through any proxy).
fn set_direct(redis: &RedisServer, key: &str, value: &str) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query(&mut redis.direct())
        .unwrap();
}

/// `GET key` straight on Redis.
fn get_direct(redis: &RedisServer, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query(&mut redis.direct())
        .unwrap()
}

/// The `bus` map of `PROXY STATS`.
#[derive(Debug, Clone)]
struct BusStats {
    instance: String,
    counters: HashMap<String, i64>,
}

impl BusStats {
    fn get(&self, name: &str) -> i64 {
        *self
            .counters
            .get(name)
            .unwrap_or_else(|| panic!("no bus.{name} in {self:?}"))
    }
}

async fn bus_stats(c: &mut MultiplexedConnection) -> BusStats {
    let v: Value = redis::cmd("PROXY")
        .arg("STATS")
        .query_async(c)
        .await
        .unwrap();
    let bus = pairs(&v)
        .into_iter()
        .find_map(|(k, v)| (k == "bus").then_some(v))
        .unwrap_or_else(|| panic!("no bus in PROXY STATS: {v:?}"));
    let mut instance = None;
    let mut counters = HashMap::new();
    for (k, v) in pairs(&bus) {
        match v {
            Value::Int(n) => {
                counters.insert(k, n);
            }
            other if k == "instance" => instance = Some(text(&other)),
            other => panic!("bus field {k} = {other:?}"),
        }
    }
    BusStats {
        instance: instance.expect("bus.instance"),
        counters,
    }
}

/// Polls `PROXY STATS` until `done` holds for the bus map (bounded).
async fn until_bus(
    c: &mut MultiplexedConnection,
    what: &str,
    limit: Duration,
    done: impl Fn(&BusStats) -> bool,
) -> BusStats {
    let deadline = Instant::now() + limit;
    loop {
        let s = bus_stats(c).await;
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls `PROXY STATS` until its top-level integer `field` satisfies `done`
/// (bounded).
async fn until_stat(
    c: &mut MultiplexedConnection,
    field: &str,
    what: &str,
    done: impl Fn(i64) -> bool,
) {
    let deadline = Instant::now() + POLL_LIMIT;
    loop {
        let v: Value = redis::cmd("PROXY")
            .arg("STATS")
            .query_async(c)
            .await
            .unwrap();
        let n = pairs(&v)
            .into_iter()
            .find_map(|(k, v)| (k == field).then_some(v));
        if matches!(n, Some(Value::Int(n)) if done(n)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn get(c: &mut MultiplexedConnection, key: &str) -> Option<String> {
    c.get(key).await.unwrap()
}

/// Reads `key` through `c` until it answers `want`, and returns how long that
/// took; fails after `POLL_LIMIT`, naming `who` still serves something else.
async fn until_served(c: &mut MultiplexedConnection, key: &str, want: &str, who: &str) -> Duration {
    let start = Instant::now();
    loop {
        let got = get(c, key).await;
        if got.as_deref() == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < POLL_LIMIT,
            "{who}: {key} still reads {got:?}, not {want:?}, after {POLL_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// [`until_served`], failing if it took longer than the staleness bound.
async fn served_within_bound(c: &mut MultiplexedConnection, key: &str, want: &str, who: &str) {
    let seen = until_served(c, key, want, who).await;
    assert!(
        seen <= STALENESS_BOUND,
        "{who}: {key} read the old value for {seen:?} (bound while the bus is healthy: \
         {STALENESS_BOUND:?})"
    );
}

/// Waits until Redis itself holds `want` at `key` (a write whose reply its
/// client does not read has run).
async fn until_redis_has(redis: &RedisServer, key: &str, want: &str) {
    let start = Instant::now();
    while get_direct(redis, key).as_deref() != Some(want) {
        assert!(
            start.elapsed() < POLL_LIMIT,
            "{key} never became {want:?} in Redis"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Reads `key` through `c` twice and proves the second read was answered from
/// L1 (Redis's GET count did not move). Returns the value.
async fn cache_it(c: &mut MultiplexedConnection, redis: &RedisServer, key: &str) -> String {
    let first = get(c, key).await;
    let before = redis.calls("get");
    let second = get(c, key).await;
    assert_eq!(first, second, "{key}: the cached value differs");
    assert_eq!(
        redis.calls("get"),
        before,
        "{key}: the second read went upstream instead of L1"
    );
    first.unwrap_or_else(|| panic!("{key} does not exist"))
}

/// Reads `key` `n` times through `c` and returns how many reads reached Redis.
async fn upstream_reads(
    c: &mut MultiplexedConnection,
    redis: &RedisServer,
    key: &str,
    want: &str,
    n: u64,
) -> u64 {
    redis.reset_stats();
    for _ in 0..n {
        assert_eq!(get(c, key).await.as_deref(), Some(want), "{key}");
    }
    redis.calls("get")
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// One Redis, one NATS, and `n` proxies caching `t:` for 60 s, each with its
/// own instance id (`inst-0`, `inst-1`, …) and a connection to it.
struct Cluster {
    /// Kept alive for the test's duration (or shut down by it). First, so
    /// they are dropped (and their logs checked) before Redis and NATS go.
    proxies: Vec<TestProxy>,
    redis: RedisServer,
    nats: NatsServer,
    cfg: Config,
    conns: Vec<MultiplexedConnection>,
}

impl Cluster {
    async fn start(n: usize) -> Self {
        Self::start_with(n, |_| {}).await
    }

    /// Starts the cluster, waits until every bus is healthy, then has every
    /// instance publish once and waits until every peer received it, so each
    /// instance knows every peer's sequence number. (A peer's first message
    /// with seq ≠ 1 is a gap by design, and an instance started after a peer
    /// missed that peer's connect-time resync: without this, each test's first
    /// message would flush L1 on the later instances.)
    async fn start_with(n: usize, tweak: impl Fn(&mut Config)) -> Self {
        Self::start_on(NatsServer::start(), n, |_, cfg| tweak(cfg)).await
    }

    /// The same on a given nats-server, with `tweak` told which instance's
    /// configuration it is changing.
    async fn start_on(nats: NatsServer, n: usize, tweak: impl Fn(usize, &mut Config)) -> Self {
        let redis = RedisServer::start();
        let mut base = config_for(&redis);
        base.cache.rules = vec![rule("t:", Duration::from_secs(60))];
        base.coherence.nats_url = nats.url();
        let mut proxies = Vec::new();
        let mut conns = Vec::new();
        for i in 0..n {
            let mut cfg = base.clone();
            cfg.coherence.instance_id = format!("inst-{i}");
            tweak(i, &mut cfg);
            let name = format!("{}~", cfg.coherence.instance_id);
            let proxy = TestProxy::start_with(cfg).await;
            let mut conn = proxy.conn().await;
            let s = until_bus(&mut conn, "the bus to be healthy", POLL_LIMIT, |s| {
                s.get("healthy") == 1
            })
            .await;
            assert!(
                s.instance.starts_with(&name),
                "the configured id and a per-process suffix: {}",
                s.instance
            );
            proxies.push(proxy);
            conns.push(conn);
        }
        tweak(0, &mut base);
        let mut cluster = Cluster {
            redis,
            nats,
            cfg: base,
            proxies,
            conns,
        };
        cluster.introduce().await;
        cluster
    }

    /// Every instance publishes a (no-op) pattern invalidation until every
    /// peer has received one from it. Retried, since a subscription may reach
    /// the server a little after the Connected event.
    async fn introduce(&mut self) {
        let n = self.conns.len();
        for i in 0..n {
            let deadline = Instant::now() + POLL_LIMIT;
            'retry: loop {
                let mut before = Vec::new();
                for c in &mut self.conns {
                    before.push(bus_stats(c).await.get("delay_samples"));
                }
                let _: i64 = redis::cmd("PROXY")
                    .arg("INVALIDATE")
                    .arg(format!("nothing-matches-this-{i}"))
                    .query_async(&mut self.conns[i])
                    .await
                    .unwrap();
                let round = Instant::now() + Duration::from_secs(1);
                for j in (0..n).filter(|&j| j != i) {
                    loop {
                        if bus_stats(&mut self.conns[j]).await.get("delay_samples") > before[j] {
                            break;
                        }
                        if Instant::now() > round {
                            assert!(
                                Instant::now() < deadline,
                                "inst-{j} never received a message from inst-{i}"
                            );
                            continue 'retry;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                break;
            }
        }
    }

    async fn bus(&mut self, i: usize) -> BusStats {
        bus_stats(&mut self.conns[i]).await
    }

    /// Declares on every instance that log lines matching `pattern` may
    /// appear (see `TestProxy::expect_log`).
    fn expect_log(&self, pattern: &str) -> &Self {
        for proxy in &self.proxies {
            proxy.expect_log(pattern);
        }
        self
    }
}

impl Drop for Cluster {
    /// Every instance stops before any log is checked: one that outlived
    /// another by `peer_timeout` would see it fall silent.
    fn drop(&mut self) {
        for proxy in &mut self.proxies {
            proxy.stop();
        }
    }
}

// ------------------------------------------------------------------- tests

/// Guards `Outbox::answered` → `Bus::publish` → `publish` (batching) →
/// `receive` (Kind::Keys): a write through A evicts the key from B's L1
/// within the documented bound, and only that key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_instance_evicts_the_value_on_the_other() {
    write_on_a_evicts_on_b(Cluster::start(2).await).await;
}

/// The same with `batch_delay = "0ms"` (no timer: the publisher's yield-and-
/// drain path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_batch_timer_a_write_still_evicts_on_the_other() {
    let c = Cluster::start_with(2, |cfg| {
        cfg.coherence.batch_delay = Dur(Duration::ZERO);
    })
    .await;
    write_on_a_evicts_on_b(c).await;
}

async fn write_on_a_evicts_on_b(mut c: Cluster) {
    set_direct(&c.redis, "t:k", "old");
    set_direct(&c.redis, "t:other", "other");
    assert_eq!(cache_it(&mut c.conns[1], &c.redis, "t:k").await, "old");
    assert_eq!(
        cache_it(&mut c.conns[1], &c.redis, "t:other").await,
        "other"
    );
    let b_before = c.bus(1).await;

    let () = c.conns[0].set("t:k", "new").await.unwrap();
    let seen = until_served(
        &mut c.conns[1],
        "t:k",
        "new",
        "B, after A's SET was acknowledged",
    )
    .await;
    assert!(
        seen <= STALENESS_BOUND,
        "B served the old value for {seen:?} after A's SET was acknowledged \
         (bound while the bus is healthy: {STALENESS_BOUND:?})"
    );

    // It was the key-specific invalidation, not a flush: the other key is
    // still served from B's L1.
    let b_after = c.bus(1).await;
    assert!(b_after.get("applied_keys") > b_before.get("applied_keys"));
    assert_eq!(b_after.get("gaps"), b_before.get("gaps"), "{b_after:?}");
    assert_eq!(
        upstream_reads(&mut c.conns[1], &c.redis, "t:other", "other", 2).await,
        0,
        "a write of t:k must not evict t:other on B (delay was {seen:?})"
    );
}

/// Guards `note_write`'s scripts (`ANY_DB`) and `Kind::AnyDbKeys`: a script
/// called from db 0 that SELECTs db 1 before writing its declared key (Redis
/// 7 runs it there; the caller stays in db 0) drops the key from db 1's L1,
/// on the instance that ran it at once and on a peer within the bound — as
/// that key, not as a flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_that_selects_another_database_evicts_its_keys_there_everywhere() {
    let mut c = Cluster::start(2).await;
    let db1 = |i: usize| {
        redis::Client::open(format!("redis://127.0.0.1:{}/1", c.proxies[i].port())).unwrap()
    };
    let mut a1 = db1(0).get_multiplexed_async_connection().await.unwrap();
    let mut b1 = db1(1).get_multiplexed_async_connection().await.unwrap();
    // Written straight to Redis: a write through A would send B an
    // invalidation that could land during B's first read below.
    let mut direct1 = redis::Client::open(format!("{}/1", c.redis.url()))
        .unwrap()
        .get_connection()
        .unwrap();
    let () = redis::cmd("MSET")
        .arg(&["t:s", "old", "t:other", "other"])
        .query(&mut direct1)
        .unwrap();
    assert_eq!(cache_it(&mut a1, &c.redis, "t:s").await, "old");
    assert_eq!(cache_it(&mut b1, &c.redis, "t:s").await, "old");
    assert_eq!(cache_it(&mut b1, &c.redis, "t:other").await, "other");
    let b_before = c.bus(1).await;

    let script = "redis.call('SELECT', 1); return redis.call('SET', KEYS[1], ARGV[1])";
    let () = redis::cmd("EVAL")
        .arg(script)
        .arg(1)
        .arg("t:s")
        .arg("new")
        .query_async(&mut c.conns[0])
        .await
        .unwrap();
    assert_eq!(
        get(&mut c.conns[0], "t:s").await,
        None,
        "the caller stayed in db 0"
    );
    assert_eq!(
        get(&mut a1, "t:s").await.as_deref(),
        Some("new"),
        "A, db 1, right after its own script was acknowledged"
    );
    served_within_bound(&mut b1, "t:s", "new", "B, db 1, after A's script").await;
    let b_after = c.bus(1).await;
    assert_eq!(
        b_after.get("flushes"),
        b_before.get("flushes"),
        "{b_after:?}"
    );
    assert_eq!(
        upstream_reads(&mut b1, &c.redis, "t:other", "other", 2).await,
        0,
        "the script's key, not everything, was dropped on B"
    );
}

/// Guards relayed writes (`Session::handle_relaying`, the acknowledging
/// stand-in) and local `CLIENT REPLY`: a client whose replies are relayed
/// rather than paired (a RESP3 client with `CLIENT TRACKING on`, a RESP3
/// subscriber) or muted (`CLIENT REPLY OFF`, the fire-and-forget writer)
/// still gets its writes published: each evicts the key on the peer within
/// the bound, counted from when Redis has the new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_from_relayed_and_muted_clients_evict_on_peers() {
    let mut c = Cluster::start(2).await;
    for k in ["t:tracked", "t:subscriber", "t:muted"] {
        set_direct(&c.redis, k, "old");
        assert_eq!(cache_it(&mut c.conns[1], &c.redis, k).await, "old");
    }
    let a = c.proxies[0].port();
    let mut tracking = Raw::connect_resp3(a).await;
    assert_eq!(
        tracking.cmd(&["CLIENT", "TRACKING", "on"]).await,
        b"+OK\r\n"[..]
    );
    let mut subscriber = Raw::connect_resp3(a).await;
    assert!(
        subscriber
            .cmd(&["SUBSCRIBE", "ch"])
            .await
            .starts_with(b">3")
    );
    let mut muted = Raw::connect(a).await;
    muted.send_str(&["CLIENT", "REPLY", "OFF"]).await;

    for (client, key) in [
        (&mut tracking, "t:tracked"),
        (&mut subscriber, "t:subscriber"),
        (&mut muted, "t:muted"),
    ] {
        client.send_str(&["SET", key, "new"]).await;
        until_redis_has(&c.redis, key, "new").await;
        served_within_bound(&mut c.conns[1], key, "new", "B, after a relayed write").await;
    }
    // A relayed transaction: its write is published after EXEC, and no
    // marker lands inside it (EXEC's reply is Redis's, element for element).
    set_direct(&c.redis, "t:txn", "old");
    assert_eq!(cache_it(&mut c.conns[1], &c.redis, "t:txn").await, "old");
    assert_eq!(tracking.frame().await, b"+OK\r\n"[..], "SET's reply");
    for (cmd, reply) in [
        (&["MULTI"][..], &b"+OK\r\n"[..]),
        (&["SET", "t:txn", "new"], b"+QUEUED\r\n"),
        (&["EXEC"], b"*1\r\n+OK\r\n"),
    ] {
        assert_eq!(tracking.cmd(cmd).await, reply, "{cmd:?}");
    }
    served_within_bound(&mut c.conns[1], "t:txn", "new", "B, after EXEC").await;

    // The relayed clients got Redis's replies and nothing else (the
    // acknowledgement is not theirs to see); the muted one, nothing.
    assert_eq!(subscriber.frame().await, b"+OK\r\n"[..], "SET's reply");
    for client in [&mut tracking, &mut subscriber] {
        assert_eq!(client.cmd(&["PING", "last"]).await, b"$4\r\nlast\r\n"[..]);
    }
    assert_eq!(muted.cmd(&["CLIENT", "REPLY", "ON"]).await, b"+OK\r\n"[..]);
}

/// Guards `Op::Ack`'s count: it is a relayed write's reply that
/// acknowledges it, not the invalidation pushes that may come first. The
/// tracking client's SET waits behind its own BLPOP while two keys it tracks
/// change (two pushes); a count that took pushes for replies would publish
/// the SET before Redis ran it, and B would cache the old value again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_write_is_acknowledged_by_its_reply_not_by_pushes() {
    let mut c = Cluster::start(2).await;
    for (k, v) in [("t:x", "0"), ("t:y", "0"), ("t:k", "old")] {
        set_direct(&c.redis, k, v);
    }
    assert_eq!(cache_it(&mut c.conns[1], &c.redis, "t:k").await, "old");
    let mut tracking = Raw::connect_resp3(c.proxies[0].port()).await;
    assert_eq!(
        tracking.cmd(&["CLIENT", "TRACKING", "on"]).await,
        b"+OK\r\n"[..]
    );
    for k in ["t:x", "t:y"] {
        assert_eq!(tracking.cmd(&["GET", k]).await, b"$1\r\n0\r\n"[..]);
    }
    tracking.send_str(&["BLPOP", "t:q", "0"]).await;
    tracking.send_str(&["SET", "t:k", "new"]).await;
    set_direct(&c.redis, "t:x", "1");
    set_direct(&c.redis, "t:y", "1");
    for _ in 0..2 {
        let push = tracking.frame().await;
        assert!(push.starts_with(b">2\r\n$10\r\ninvalidate"), "{push:?}");
    }
    // Whatever A published so far has reached B once a message A publishes
    // now has (NATS keeps one publisher's order): then B reads. The SET has
    // not run, so B still serves the old value — from Redis again, had it
    // been told too early.
    let before = c.bus(1).await.get("delay_samples");
    let _: i64 = redis::cmd("PROXY")
        .arg(&["INVALIDATE", "nothing-matches-this"])
        .query_async(&mut c.conns[0])
        .await
        .unwrap();
    until_bus(&mut c.conns[1], "B to hear A", POLL_LIMIT, |s| {
        s.get("delay_samples") > before
    })
    .await;
    assert_eq!(get(&mut c.conns[1], "t:k").await.as_deref(), Some("old"));
    let mut direct = c.redis.direct();
    let _: i64 = redis::cmd("LPUSH")
        .arg("t:q")
        .arg("v")
        .query(&mut direct)
        .unwrap();
    assert!(tracking.frame().await.starts_with(b"*2"), "BLPOP's reply");
    assert_eq!(tracking.frame().await, b"+OK\r\n"[..], "SET's reply");
    served_within_bound(&mut c.conns[1], "t:k", "new", "B, after the SET ran").await;
}

/// Guards the database of a relayed RESP2 subscriber's writes: Redis
/// refuses its SELECT while it is subscribed, so a SELECT relayed then
/// leaves nearcache unsure which database the writes after it land in —
/// their keys are dropped in every database rather than in the one it would
/// guess wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_whose_select_redis_refused_still_invalidates_the_right_database() {
    let mut c = Cluster::start(2).await;
    let key = "t:db0";
    set_direct(&c.redis, key, "old");
    let mut a_reader = c.proxies[0].conn().await;
    assert_eq!(cache_it(&mut a_reader, &c.redis, key).await, "old");
    assert_eq!(cache_it(&mut c.conns[1], &c.redis, key).await, "old");
    let mut s = Raw::connect(c.proxies[0].port()).await;
    let script: &[&[&str]] = &[
        &["SUBSCRIBE", "ch"],
        &["SELECT", "1"],
        &["UNSUBSCRIBE", "ch"],
        &["SET", key, "new"],
    ];
    s.write(&crate::compat::encode_pipeline(script)).await;
    assert!(s.frame().await.starts_with(b"*3"), "subscribed");
    assert!(s.frame().await.starts_with(b"-ERR Can't execute 'select'"));
    assert!(s.frame().await.starts_with(b"*3"), "unsubscribed");
    assert_eq!(s.frame().await, b"+OK\r\n"[..], "SET, in db 0");
    assert_eq!(get_direct(&c.redis, key).as_deref(), Some("new"));
    assert_eq!(get(&mut a_reader, key).await.as_deref(), Some("new"), "A");
    served_within_bound(&mut c.conns[1], key, "new", "B").await;
}

/// Guards `Outbox`'s drop: a client that pipelines a write and vanishes
/// (here with a reset, so writing it a reply fails) leaves the write running
/// in Redis; its keys must still be published once Redis has run it, though
/// nobody is left to read the reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_from_a_client_that_vanished_is_still_published() {
    let mut c = Cluster::start(2).await;
    let key = "t:orphan";
    set_direct(&c.redis, key, "old");
    assert_eq!(cache_it(&mut c.conns[1], &c.redis, key).await, "old");
    // Redis holds the write while the client goes, so its reply comes
    // after the session has failed to write the one before it.
    let mut direct = c.redis.direct();
    let () = redis::cmd("CLIENT")
        .arg(&["PAUSE", "300", "WRITE"])
        .query(&mut direct)
        .unwrap();
    let gone = tokio::net::TcpStream::connect(("127.0.0.1", c.proxies[0].port()))
        .await
        .unwrap();
    // (Deprecated for blocking on drop; a zero linger never blocks: it
    // resets the connection, which is the point here.)
    #[allow(deprecated)]
    gone.set_linger(Some(Duration::ZERO)).unwrap();
    let mut gone = gone;
    tokio::io::AsyncWriteExt::write_all(
        &mut gone,
        &crate::compat::encode_pipeline([&["CLIENT", "ID"][..], &["SET", key, "new"]]),
    )
    .await
    .unwrap();
    drop(gone);
    until_redis_has(&c.redis, key, "new").await;
    served_within_bound(
        &mut c.conns[1],
        key,
        "new",
        "B, after a vanished client's SET",
    )
    .await;
}

/// Guards the acknowledgement marker (`Op::Ack`) against publishing a
/// relayed write when it is sent rather than once Redis has run it: with
/// Redis's writes paused (`CLIENT PAUSE WRITE`), a peer told too early would
/// read the old value again from Redis and keep it for the whole TTL — and so
/// would another client of the writing instance. Reads go on during the
/// pause; after it, both see the new value within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_write_is_published_once_redis_has_run_it() {
    let mut c = Cluster::start(2).await;
    let a = c.proxies[0].port();
    let mut a_reader = c.proxies[0].conn().await;
    let mut tracking = Raw::connect_resp3(a).await;
    assert_eq!(
        tracking.cmd(&["CLIENT", "TRACKING", "on"]).await,
        b"+OK\r\n"[..]
    );
    // The second time a command whose replies cannot be counted follows the
    // write: the write must still wait for its own reply.
    for (key, then) in [
        ("t:paused", None),
        ("t:then", Some(&["CLIENT", "REPLY", "ON"][..])),
    ] {
        set_direct(&c.redis, key, "old");
        assert_eq!(cache_it(&mut c.conns[1], &c.redis, key).await, "old");
        assert_eq!(cache_it(&mut a_reader, &c.redis, key).await, "old");
        let mut direct = c.redis.direct();
        let () = redis::cmd("CLIENT")
            .arg(&["PAUSE", "400", "WRITE"])
            .query(&mut direct)
            .unwrap();
        tracking.send_str(&["SET", key, "new"]).await;
        if let Some(then) = then {
            tracking.send_str(then).await;
        }
        // While the write waits, readers on both instances keep reading (a
        // premature invalidation would let one of these fill the old value).
        while get_direct(&c.redis, key).as_deref() != Some("new") {
            for conn in [&mut c.conns[1], &mut a_reader] {
                let got = get(conn, key).await;
                assert!(matches!(got.as_deref(), Some("old" | "new")), "{got:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(tracking.frame().await, b"+OK\r\n"[..], "SET's reply");
        if then.is_some() {
            assert_eq!(tracking.frame().await, b"+OK\r\n"[..], "{then:?}");
        }
        for (conn, who) in [
            (&mut c.conns[1], "B"),
            (&mut a_reader, "another client of A"),
        ] {
            served_within_bound(conn, key, "new", who).await;
        }
    }
}

/// Guards the acknowledgement of a relayed client's writes after a MULTI
/// Redis refused (here the upstream user may not run MULTI): the writes run
/// at once, so they are published at their replies, not held for an EXEC
/// that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_write_after_a_refused_multi_is_published() {
    let mut c = Cluster::start(2).await;
    let key = "t:nomulti";
    set_direct(&c.redis, key, "old");
    assert_eq!(cache_it(&mut c.conns[1], &c.redis, key).await, "old");
    let mut tracking = Raw::connect_resp3(c.proxies[0].port()).await;
    assert_eq!(
        tracking.cmd(&["CLIENT", "TRACKING", "on"]).await,
        b"+OK\r\n"[..]
    );
    let mut direct = c.redis.direct();
    let () = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "-multi"])
        .query(&mut direct)
        .unwrap();
    let refused = tracking.cmd(&["MULTI"]).await;
    assert!(refused.starts_with(b"-NOPERM"), "{refused:?}");
    assert_eq!(tracking.cmd(&["SET", key, "new"]).await, b"+OK\r\n"[..]);
    served_within_bound(&mut c.conns[1], key, "new", "B").await;
}

/// Guards the credentials in `Bus::start`: with a NATS that requires a user
/// and password, instances given them form a bus (a write on one evicts on
/// the other); one given a wrong password is refused — it never serves L1,
/// so it cannot serve what it would never hear invalidated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_user_and_password_are_used_and_a_wrong_one_keeps_l1_off() {
    let nats = NatsServer::start_with(&["--user", "bot", "--pass", "s3cret"]);
    let c = Cluster::start_on(nats, 2, |_, cfg| {
        cfg.coherence.user = "bot".into();
        cfg.coherence.password = "s3cret".into();
    })
    .await;

    let mut cfg = c.cfg.clone();
    cfg.coherence.instance_id = "intruder".into();
    cfg.coherence.password = "wrong".into();
    let intruder = TestProxy::start_with(cfg).await;
    let mut conn = intruder.conn().await;
    let deadline = Instant::now() + POLL_LIMIT;
    while !c.nats.log().contains("intruder~") {
        assert!(
            Instant::now() < deadline,
            "NATS never saw the intruder connect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        c.nats.log().contains("authentication error")
            || c.nats.log().contains("Authorization Error"),
        "{}",
        c.nats.log()
    );
    assert_eq!(bus_stats(&mut conn).await.get("healthy"), 0);
    set_direct(&c.redis, "t:k", "v");
    assert_eq!(
        upstream_reads(&mut conn, &c.redis, "t:k", "v", 3).await,
        3,
        "an instance refused by NATS served L1"
    );
    // Done with it: stopped before the cluster (and its Redis) goes.
    intruder.shutdown().await;
    write_on_a_evicts_on_b(c).await;
}

/// Guards `CoherenceConfig::subject`: deployments sharing one NATS under
/// different namespaces publish on their own subjects and never invalidate
/// each other's L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_keep_deployments_on_one_nats_apart() {
    use futures_util::StreamExt;
    let mut c = Cluster::start_on(NatsServer::start(), 2, |_, cfg| {
        cfg.coherence.namespace = "desk-a".into();
    })
    .await;
    let mut watch = async_nats::connect(c.nats.url())
        .await
        .unwrap()
        .subscribe("nearcache.*.invalidate")
        .await
        .unwrap();
    let mut cfg = c.cfg.clone();
    cfg.coherence.namespace = "desk-b".into();
    cfg.coherence.instance_id = "other-desk".into();
    let other = TestProxy::start_with(cfg).await;
    let mut oc = other.conn().await;
    until_bus(&mut oc, "desk-b's bus to be healthy", POLL_LIMIT, |s| {
        s.get("healthy") == 1
    })
    .await;
    set_direct(&c.redis, "t:k", "old");
    assert_eq!(cache_it(&mut oc, &c.redis, "t:k").await, "old");

    // desk-a's write: on desk-a's subject, applied by desk-a's B…
    let b0 = c.bus(1).await;
    let () = c.conns[0].set("t:k", "new").await.unwrap();
    until_bus(&mut c.conns[1], "B to apply A's write", POLL_LIMIT, |s| {
        s.get("applied_keys") > b0.get("applied_keys")
    })
    .await;
    let deadline = Instant::now() + POLL_LIMIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, watch.next())
            .await
            .expect("no message carried A's write")
            .unwrap();
        let m = Message::decode(msg.payload).unwrap();
        if m.kind == Kind::Keys {
            assert_eq!(msg.subject.as_str(), "nearcache.desk-a.invalidate");
            assert!(m.instance.starts_with("inst-0~"), "{m:?}");
            break;
        }
    }
    // …and not by the instance of the other desk, which heard nothing.
    let o = bus_stats(&mut oc).await;
    assert_eq!(o.get("received"), 0, "{o:?}");
    assert_eq!(o.get("applied_keys"), 0, "{o:?}");
    assert_eq!(
        upstream_reads(&mut oc, &c.redis, "t:k", "old", 1).await,
        0,
        "desk-b's L1 was invalidated by desk-a's write"
    );
}

/// Guards the token option of `Bus::start`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_token_authenticates_the_bus() {
    let nats = NatsServer::start_with(&["--auth", "t0ken"]);
    let c = Cluster::start_on(nats, 2, |_, cfg| cfg.coherence.token = "t0ken".into()).await;
    write_on_a_evicts_on_b(c).await;
}

/// Guards `creds_file`: a nats-server in operator (JWT) mode admits the
/// instances by their user's `.creds` file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_creds_file_authenticates_the_bus() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nats-jwt");
    let conf = fixtures.join("jwt.conf");
    let creds = fixtures.join("TestUser.creds");
    let nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]);
    let c = Cluster::start_on(nats, 2, |_, cfg| {
        cfg.coherence.creds_file = creds.to_str().unwrap().into();
    })
    .await;
    write_on_a_evicts_on_b(c).await;
}

/// Guards the TLS options of `Bus::start`: a NATS that requires TLS, with a
/// certificate from a private CA that `tls_ca_file` names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_tls_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let tls = tls_certificates(dir.path());
    let nats = NatsServer::start_with(&[
        "--tls",
        "--tlscert",
        tls.server_cert.to_str().unwrap(),
        "--tlskey",
        tls.server_key.to_str().unwrap(),
    ]);
    let c = Cluster::start_on(nats, 2, |_, cfg| {
        cfg.coherence.tls_required = true;
        cfg.coherence.tls_ca_file = tls.ca.to_str().unwrap().into();
    })
    .await;
    write_on_a_evicts_on_b(c).await;
}

/// Guards `tls_cert_file`/`tls_key_file`: a NATS that verifies its clients'
/// certificates (mutual TLS) accepts instances that present one signed by
/// its CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_mutual_tls_takes_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let tls = tls_certificates(dir.path());
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let nats = NatsServer::start_with(&[
        "--tlsverify",
        "--tlscert",
        &path(&tls.server_cert),
        "--tlskey",
        &path(&tls.server_key),
        "--tlscacert",
        &path(&tls.ca),
    ]);
    let c = Cluster::start_on(nats, 2, |_, cfg| {
        cfg.coherence.tls_required = true;
        cfg.coherence.tls_ca_file = path(&tls.ca);
        cfg.coherence.tls_cert_file = path(&tls.client_cert);
        cfg.coherence.tls_key_file = path(&tls.client_key);
    })
    .await;
    write_on_a_evicts_on_b(c).await;
}

/// Guards `Bus::leave` → `receive` (`Kind::Leave`): an instance shut down
/// cleanly says goodbye after its last invalidation, and its peers forget it
/// rather than flush their L1 when its heartbeats stop — a rolling restart
/// does not empty every other instance's cache. (An instance that vanishes
/// without a word still costs a flush: the checker's paused-proxy phase.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_says_goodbye_and_peers_keep_their_l1() {
    let mut c = Cluster::start(2).await;
    for k in ["t:k", "t:kept"] {
        set_direct(&c.redis, k, "old");
        assert_eq!(cache_it(&mut c.conns[1], &c.redis, k).await, "old");
    }
    let b0 = c.bus(1).await;
    // A write acknowledged just before the shutdown still reaches B.
    let () = c.conns[0].set("t:k", "new").await.unwrap();
    c.proxies.remove(0).shutdown().await;
    let b1 = until_bus(&mut c.conns[1], "B to see A leave", POLL_LIMIT, |s| {
        s.get("peers_left") > b0.get("peers_left")
    })
    .await;
    assert!(b1.get("applied_keys") > b0.get("applied_keys"), "{b1:?}");
    assert_eq!(get(&mut c.conns[1], "t:k").await.as_deref(), Some("new"));

    // Well past peer_timeout (100 ms): A's silence flushed nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b2 = c.bus(1).await;
    assert_eq!(b2.get("silent_peers"), b0.get("silent_peers"), "{b2:?}");
    assert_eq!(b2.get("flushes"), b0.get("flushes"), "{b2:?}");
    assert_eq!(
        upstream_reads(&mut c.conns[1], &c.redis, "t:kept", "old", 2).await,
        0,
        "B's L1 was flushed after A left"
    );
}

/// Guards `receive`'s own-message filter: A's writes reach B, never A itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_ignore_their_own_messages() {
    let mut c = Cluster::start(2).await;
    let a0 = c.bus(0).await;
    let b0 = c.bus(1).await;

    for i in 0..5 {
        let () = c.conns[0].set(format!("t:w{i}"), i).await.unwrap();
    }
    let a1 = until_bus(&mut c.conns[0], "A to publish", POLL_LIMIT, |s| {
        s.get("published_keys") >= a0.get("published_keys") + 5
    })
    .await;
    assert!(a1.get("published") > a0.get("published"), "{a1:?}");
    // Peers' heartbeats make `received` grow on its own, so the proof is in
    // applied keys: B applies A's five, A applies none of its own.
    until_bus(&mut c.conns[1], "B to apply A's keys", POLL_LIMIT, |s| {
        s.get("applied_keys") >= b0.get("applied_keys") + 5
    })
    .await;

    // A marker from B (one key, written through B): NATS delivers to A in
    // order, so once A has applied it, A has already been handed its own
    // messages, which B received before writing the marker.
    let () = c.conns[1].set("t:marker", 1).await.unwrap();
    let a2 = until_bus(&mut c.conns[0], "A to apply B's marker", POLL_LIMIT, |s| {
        s.get("applied_keys") > a0.get("applied_keys")
    })
    .await;
    assert_eq!(
        a2.get("applied_keys"),
        a0.get("applied_keys") + 1,
        "A applied its own messages: {a2:?}"
    );
}

/// Guards the publisher's size bound: one write whose keys add up to more
/// than NATS accepts in one message (its `max_payload`, 1 MiB by default)
/// still reaches peers key by key, split over several messages — not as a
/// refused publish, a sequence gap and a flush of every peer's L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_too_big_for_one_message_is_split_not_flushed() {
    let mut c = Cluster::start(2).await;
    for k in ["t:first", "t:last", "t:other"] {
        set_direct(&c.redis, k, "old");
        assert_eq!(cache_it(&mut c.conns[1], &c.redis, k).await, "old");
    }
    let a0 = c.bus(0).await;
    let b0 = c.bus(1).await;

    // ~1.5 MiB of key names in one MSET, t:first first and t:last last.
    let pad = "x".repeat(500);
    let mut mset = redis::cmd("MSET");
    mset.arg("t:first").arg("new");
    for i in 0..3000 {
        mset.arg(format!("t:big:{i}:{pad}")).arg("v");
    }
    mset.arg("t:last").arg("new");
    let () = mset.query_async(&mut c.conns[0]).await.unwrap();

    let b1 = until_bus(&mut c.conns[1], "B to apply every key", POLL_LIMIT, |s| {
        s.get("applied_keys") >= b0.get("applied_keys") + 3002
    })
    .await;
    assert_eq!(
        get(&mut c.conns[1], "t:first").await.as_deref(),
        Some("new")
    );
    assert_eq!(get(&mut c.conns[1], "t:last").await.as_deref(), Some("new"));
    let a1 = c.bus(0).await;
    assert_eq!(a1.get("publish_errors"), a0.get("publish_errors"), "{a1:?}");
    assert!(
        a1.get("published") >= a0.get("published") + 2,
        "one message cannot hold 1.5 MiB of keys: {a1:?}"
    );
    assert_eq!(b1.get("gaps"), b0.get("gaps"), "{b1:?}");
    assert_eq!(b1.get("flushes"), b0.get("flushes"), "{b1:?}");
    assert_eq!(
        upstream_reads(&mut c.conns[1], &c.redis, "t:other", "old", 2).await,
        0,
        "B's L1 was flushed: t:other went upstream"
    );
}

/// Guards `receiver::Missing`: a peer cut off from NATS alone — or still
/// reconnecting after a NATS outage while this instance is back — goes on
/// acknowledging writes whose invalidations reach nobody. Until it is heard
/// again, or its grace ends, the others do not serve L1: what it writes
/// meanwhile is read from Redis, never from a stale entry (the checker's
/// NATS-outage phase found reads stale by the reconnects' skew).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_may_still_be_reconnecting_leaves_no_stale_value_behind() {
    let nats = NatsServer::start();
    let relay = TcpRelay::start(nats.port()).await;
    let via_relay = format!("nats://127.0.0.1:{}", relay.port());
    // A long peer_timeout, so the grace (1 s + peer_timeout) comfortably
    // outlasts the steps below on a loaded machine.
    let mut c = Cluster::start_on(nats, 2, |i, cfg| {
        cfg.coherence.peer_timeout = Dur(Duration::from_secs(1));
        if i == 0 {
            cfg.coherence.nats_url = via_relay.clone();
        }
    })
    .await;
    c.proxies[0].expect_log(BUS_LOST).expect_log(PEER_SILENT);
    c.proxies[1]
        .must_log(&format!("{PEER_SILENT} peer=inst-0~"))
        .expect_log(GAP);
    set_direct(&c.redis, "t:k", "old");
    assert_eq!(cache_it(&mut c.conns[1], &c.redis, "t:k").await, "old");

    relay.cut();
    until_bus(&mut c.conns[0], "A to see NATS gone", POLL_LIMIT, |s| {
        s.get("healthy") == 0
    })
    .await;
    until_bus(&mut c.conns[1], "B to give up on A", POLL_LIMIT, |s| {
        s.get("silent_peers") > 0 && s.get("awaiting_peers") == 1
    })
    .await;
    // B is connected and healthy, yet does not cache what it reads: A may be
    // about to write it.
    assert_eq!(c.bus(1).await.get("healthy"), 1);
    assert_eq!(
        upstream_reads(&mut c.conns[1], &c.redis, "t:k", "old", 2).await,
        2,
        "B served L1 while A may still be writing"
    );
    let () = c.conns[0].set("t:k", "new").await.unwrap();
    assert_eq!(get(&mut c.conns[1], "t:k").await.as_deref(), Some("new"));
    assert_eq!(
        c.bus(1).await.get("awaiting_peers"),
        1,
        "still within the grace"
    );

    // A is heard again: B serves L1 at once.
    relay.restore();
    until_bus(&mut c.conns[1], "B to hear A again", POLL_LIMIT, |s| {
        s.get("awaiting_peers") == 0
    })
    .await;
    until_bus(&mut c.conns[0], "A to be healthy again", POLL_LIMIT, |s| {
        s.get("healthy") == 1
    })
    .await;
    assert_eq!(cache_it(&mut c.conns[1], &c.redis, "t:k").await, "new");
}

/// Guards `Queue::push` while the bus is down: an instance cut off from NATS
/// (its peer still connected) drops its writes' invalidations rather than
/// queueing them for as long as the outage lasts — memory would grow with
/// every write — and when it is back, the peer flushes: nothing it wrote
/// meanwhile is served stale for a whole TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_while_cut_off_from_nats_are_dropped_and_peers_flush_on_return() {
    let nats = NatsServer::start();
    let relay = TcpRelay::start(nats.port()).await;
    let via_relay = format!("nats://127.0.0.1:{}", relay.port());
    let mut c = Cluster::start_on(nats, 2, |i, cfg| {
        if i == 0 {
            cfg.coherence.nats_url = via_relay.clone();
            cfg.coherence.max_queued_keys = 100;
        }
    })
    .await;
    // A, cut off, loses the bus and stops hearing B; B stops hearing A, and
    // sees a gap when A is back (what the test is about).
    c.proxies[0].expect_log(BUS_LOST).expect_log(PEER_SILENT);
    c.proxies[1]
        .must_log(&format!("{PEER_SILENT} peer=inst-0~"))
        .must_log(&format!("{GAP} peer=inst-0~"));
    set_direct(&c.redis, "t:k", "old");
    let a0 = c.bus(0).await;

    relay.cut();
    until_bus(&mut c.conns[0], "A to see NATS gone", POLL_LIMIT, |s| {
        s.get("healthy") == 0
    })
    .await;
    // B notices A's silence and flushes once, then reads from Redis while A
    // may still be reconnecting (see the test after this one); once that
    // grace is over, cache t:k on B, so only A's return can evict it.
    let b0 = until_bus(&mut c.conns[1], "B to give up on A", POLL_LIMIT, |s| {
        s.get("silent_peers") > 0
    })
    .await;
    until_bus(&mut c.conns[1], "B's grace for A to end", POLL_LIMIT, |s| {
        s.get("awaiting_peers") == 0
    })
    .await;
    assert_eq!(cache_it(&mut c.conns[1], &c.redis, "t:k").await, "old");

    let () = c.conns[0].set("t:k", "new").await.unwrap();
    let mut mset = redis::cmd("MSET");
    for i in 0..5000 {
        mset.arg(format!("t:bulk:{i}")).arg(i);
    }
    let () = mset.query_async(&mut c.conns[0]).await.unwrap();
    let a1 = c.bus(0).await;
    assert!(
        a1.get("dropped_keys") >= a0.get("dropped_keys") + 5001,
        "A queued its invalidations while cut off: {a1:?}"
    );
    assert!(a1.get("queued_keys") <= 100, "{a1:?}");
    // The partition is real, and has outlasted the grace: B is connected and
    // has not heard of the write (the documented limit; `redis_tracking`
    // closes it).
    assert_eq!(c.bus(1).await.get("healthy"), 1);
    assert_eq!(
        upstream_reads(&mut c.conns[1], &c.redis, "t:k", "old", 1).await,
        0
    );

    relay.restore();
    until_served(
        &mut c.conns[1],
        "t:k",
        "new",
        "B, after A's link to NATS returned",
    )
    .await;
    let b1 = c.bus(1).await;
    assert!(
        b1.get("gaps") > b0.get("gaps"),
        "B flushed on A's return: {b1:?}"
    );
    until_bus(&mut c.conns[0], "A to be healthy again", POLL_LIMIT, |s| {
        s.get("healthy") == 1 && s.get("queued_keys") == 0
    })
    .await;
}

/// Guards `wire_id`: two instances given the same `instance_id` (one shared
/// config file deployed everywhere) would each take the other's messages
/// for their own echo and ignore them — no coherence at all between them,
/// silently. Each process's random suffix keeps them distinct peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_sharing_an_id_still_invalidate_each_other() {
    let mut c = Cluster::start_on(NatsServer::start(), 2, |_, cfg| {
        cfg.coherence.instance_id = "bot".into();
    })
    .await;
    let redis = &c.redis;
    let [ca, cb] = &mut c.conns[..] else {
        unreachable!()
    };
    set_direct(redis, "t:k", "old");
    // Both ways, a few times.
    for round in 0..4 {
        let (writer, reader) = if round % 2 == 0 {
            (&mut *ca, &mut *cb)
        } else {
            (&mut *cb, &mut *ca)
        };
        let cached = cache_it(reader, redis, "t:k").await;
        let value = format!("v{round}");
        let () = writer.set("t:k", &value).await.unwrap();
        let what = format!("round {round}: the namesake (cached {cached:?}), after the write");
        until_served(reader, "t:k", &value, &what).await;
    }
    let (ia, ib) = (bus_stats(ca).await.instance, bus_stats(cb).await.instance);
    assert!(
        ia.starts_with("bot~") && ib.starts_with("bot~"),
        "{ia} {ib}"
    );
    assert_ne!(ia, ib);
}

const KEYS: [(&str, &str); 4] = [
    ("t:a1", "A1"),
    ("t:a2", "A2"),
    ("t:b1", "B1"),
    ("t:b2", "B2"),
];

/// Sets `KEYS` in Redis and caches them on every instance but the first.
async fn cache_keys_on_peers(c: &mut Cluster) {
    for (k, v) in KEYS {
        set_direct(&c.redis, k, v);
    }
    for i in 1..c.conns.len() {
        for (k, v) in KEYS {
            assert_eq!(cache_it(&mut c.conns[i], &c.redis, k).await, v);
        }
    }
}

fn assert_redis_unchanged(redis: &RedisServer) {
    for (k, v) in KEYS {
        assert_eq!(get_direct(redis, k).as_deref(), Some(v), "{k} in Redis");
    }
    let size: i64 = redis::cmd("DBSIZE").query(&mut redis.direct()).unwrap();
    assert_eq!(size, KEYS.len() as i64, "DBSIZE");
}

/// Guards `PROXY INVALIDATE` → `Bus::publish_pattern` → `receive`
/// (Kind::Pattern): matching keys are dropped on every peer, others kept,
/// Redis untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_invalidate_pattern_reaches_every_instance() {
    let mut c = Cluster::start(3).await;
    cache_keys_on_peers(&mut c).await;
    let before: Vec<BusStats> = vec![c.bus(1).await, c.bus(2).await];

    let _: i64 = redis::cmd("PROXY")
        .arg("INVALIDATE")
        .arg("t:a*")
        .query_async(&mut c.conns[0])
        .await
        .unwrap();
    for (i, b) in [1, 2].into_iter().zip(&before) {
        let s = until_bus(&mut c.conns[i], "the pattern to arrive", POLL_LIMIT, |s| {
            s.get("delay_samples") > b.get("delay_samples")
        })
        .await;
        assert_eq!(s.get("gaps"), b.get("gaps"), "inst-{i}: {s:?}");
        assert_eq!(s.get("flushes"), b.get("flushes"), "inst-{i}: {s:?}");
        assert_eq!(
            s.get("applied_keys"),
            b.get("applied_keys") + 2,
            "inst-{i} dropped t:a1 and t:a2: {s:?}"
        );
    }
    for i in [1, 2] {
        c.redis.reset_stats();
        for (k, v) in &KEYS[..2] {
            assert_eq!(get(&mut c.conns[i], k).await.as_deref(), Some(*v));
        }
        assert_eq!(
            c.redis.calls("get"),
            2,
            "inst-{i}: t:a1 and t:a2 must be re-fetched"
        );
        for (k, v) in &KEYS[2..] {
            assert_eq!(get(&mut c.conns[i], k).await.as_deref(), Some(*v));
        }
        assert_eq!(
            c.redis.calls("get"),
            2,
            "inst-{i}: t:b1 and t:b2 must still be served from L1"
        );
    }
    assert_redis_unchanged(&c.redis);
}

/// Guards the publisher's message order: keys batched before a flush in the
/// same window are numbered and sent before it, so the peer sees consecutive
/// sequence numbers — no gap, and no flush beyond the one asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_then_flush_in_one_batch_arrive_in_sequence() {
    // A long window, so the flush surely joins the write's batch.
    let mut c = Cluster::start_with(2, |cfg| {
        cfg.coherence.batch_delay = Dur(Duration::from_millis(100));
    })
    .await;
    // The first invalidation after a quiet spell leaves at once; the next
    // ones, within the window after it, wait and share a message.
    let b_prime = c.bus(1).await;
    let () = c.conns[0].set("t:prime", 1).await.unwrap();
    until_bus(
        &mut c.conns[1],
        "B to get the first write",
        POLL_LIMIT,
        |s| s.get("applied_keys") > b_prime.get("applied_keys"),
    )
    .await;
    let b0 = c.bus(1).await;
    // The write's keys are queued when Redis acknowledges it, the flush
    // after: both within one batch window.
    let () = c.conns[0].set("t:order", 1).await.unwrap();
    let () = redis::cmd("PROXY")
        .arg("FLUSH")
        .query_async(&mut c.conns[0])
        .await
        .unwrap();
    let b1 = until_bus(
        &mut c.conns[1],
        "B to get the keys and the flush",
        POLL_LIMIT,
        |s| s.get("delay_samples") >= b0.get("delay_samples") + 2,
    )
    .await;
    assert_eq!(
        b1.get("gaps"),
        b0.get("gaps"),
        "out-of-order sequence: {b1:?}"
    );
    assert_eq!(b1.get("flushes"), b0.get("flushes") + 1, "{b1:?}");
    assert_eq!(b1.get("applied_keys"), b0.get("applied_keys") + 1, "{b1:?}");
}

/// Guards `PROXY FLUSH` → `Bus::publish_flush` → `receive` (Kind::Flush):
/// every peer drops everything, Redis untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_flush_reaches_every_instance() {
    let mut c = Cluster::start(3).await;
    cache_keys_on_peers(&mut c).await;
    let before: Vec<BusStats> = vec![c.bus(1).await, c.bus(2).await];

    let () = redis::cmd("PROXY")
        .arg("FLUSH")
        .query_async(&mut c.conns[0])
        .await
        .unwrap();
    for (i, b) in [1, 2].into_iter().zip(&before) {
        until_bus(&mut c.conns[i], "the flush to arrive", POLL_LIMIT, |s| {
            s.get("flushes") > b.get("flushes")
        })
        .await;
    }
    for i in [1, 2] {
        c.redis.reset_stats();
        for (k, v) in KEYS {
            assert_eq!(get(&mut c.conns[i], k).await.as_deref(), Some(v));
        }
        assert_eq!(
            c.redis.calls("get"),
            KEYS.len() as u64,
            "inst-{i}: every key must be re-fetched after PROXY FLUSH"
        );
    }
    assert_redis_unchanged(&c.redis);
}

/// Guards `Bus::l1_usable` (bypass) and `EventHandler::on` (Disconnected,
/// then Connected: flush): no L1 while NATS is down, and nothing cached before
/// the outage is served after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_nats_is_down_l1_is_bypassed_and_flushed_on_return() {
    let mut c = Cluster::start(2).await;
    // Killing NATS: every instance loses the bus and stops hearing its peer;
    // after the return, what peers published meanwhile shows as a gap.
    c.expect_log(BUS_LOST)
        .expect_log(PEER_SILENT)
        .expect_log(GAP);
    set_direct(&c.redis, "t:k", "v");
    cache_it(&mut c.conns[1], &c.redis, "t:k").await;

    c.nats.kill();
    let down = until_bus(&mut c.conns[1], "B to see NATS go", POLL_LIMIT, |s| {
        s.get("healthy") == 0
    })
    .await;
    assert_eq!(
        upstream_reads(&mut c.conns[1], &c.redis, "t:k", "v", 5).await,
        5,
        "while the bus is down (bypass) every read must go upstream"
    );

    c.nats.restart();
    let up = until_bus(
        &mut c.conns[1],
        "B to reconnect",
        Duration::from_secs(20),
        |s| s.get("healthy") == 1,
    )
    .await;
    assert!(
        up.get("flushes") > down.get("flushes"),
        "reconnecting must flush L1: {down:?} → {up:?}"
    );
    // A's first message after the outage may show B a gap (or come from a
    // peer B forgot as silent) and flush B once more: wait until B has
    // handled it — B is done with a message once it takes the next.
    until_bus(
        &mut c.conns[1],
        "B to hear A twice after reconnecting",
        POLL_LIMIT,
        |s| s.get("received") >= up.get("received") + 2,
    )
    .await;
    assert_eq!(
        upstream_reads(&mut c.conns[1], &c.redis, "t:k", "v", 3).await,
        1,
        "after the bus returns: one miss (L1 was flushed), then hits"
    );
}

/// Guards `fill::warm` (a peer's hot keys first) and `Bus::peer_hot_keys`:
/// an instance starting beside one that has been reading ten keys of 500
/// asks it over NATS and, allowed ten keys, warms exactly those (a SCAN
/// would pick ten of 500 at random): reading them through it reaches
/// Redis not once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_instance_warms_the_keys_its_peer_reads_first() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let mut d = redis.direct();
    for i in 0..500 {
        let _: () = redis::cmd("SET")
            .arg(format!("w:{i}"))
            .arg(i)
            .query(&mut d)
            .unwrap();
    }
    let mut base = config_for(&redis);
    base.cache.rules = vec![RuleConfig {
        warm: true,
        ..rule("w:", Duration::from_secs(60))
    }];
    base.coherence.nats_url = nats.url();
    let mut a_cfg = base.clone();
    a_cfg.coherence.instance_id = "inst-a".into();
    let a = TestProxy::start_with(a_cfg).await;
    let mut ca = a.conn().await;
    let hot: Vec<String> = (0..10).map(|i| format!("w:{}", i * 37 + 11)).collect();
    let deadline = Instant::now() + POLL_LIMIT;
    loop {
        // (Rotated each round: one read in eight is sampled, and a fixed
        // cycle of ten would only ever sample five of them.)
        for round in 0..50 {
            for k in hot.iter().cycle().skip(round % 10).take(10) {
                let _: String = ca.get(k).await.unwrap();
            }
        }
        let top: Value = redis::cmd("PROXY")
            .arg("HOTKEYS")
            .arg(10)
            .query_async(&mut ca)
            .await
            .unwrap();
        let Value::Array(top) = top else {
            panic!("HOTKEYS: {top:?}")
        };
        let named: Vec<String> = top
            .iter()
            .filter_map(|e| {
                pairs(e)
                    .into_iter()
                    .find(|(k, _)| k == "key")
                    .map(|(_, v)| text(&v))
            })
            .collect();
        if hot.iter().all(|k| named.contains(k)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's hot keys never showed: {named:?}"
        );
    }

    let mut b_cfg = base.clone();
    b_cfg.coherence.instance_id = "inst-b".into();
    b_cfg.cache.warm.max_keys = 10;
    let b = TestProxy::start_with(b_cfg).await;
    let mut cb = b.conn().await;
    // B's first messages from A may show it a gap, which flushes L1 and
    // warms again: a check that a flush interrupted is made again.
    let deadline = Instant::now() + POLL_LIMIT;
    loop {
        let stats = proxy_stats(&mut cb).await;
        if stats["warm.passes"] == 0 || stats["warm.running"] == 1 {
            assert!(Instant::now() < deadline, "B never warmed: {stats:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        // Every pass took A's ten, and nothing else (max_keys = 10).
        assert_eq!(
            stats["warm.peer_keys"],
            10 * stats["warm.passes"],
            "{stats:?}"
        );
        assert_eq!(stats["rules.prefix:w:.entries"], 10, "{stats:?}");
        redis.reset_stats();
        for k in &hot {
            let v: String = cb.get(k).await.unwrap();
            assert_eq!(format!("w:{v}"), *k);
        }
        if proxy_stats(&mut cb).await["bus.flushes"] != stats["bus.flushes"] {
            continue;
        }
        assert_eq!(redis.calls("get"), 0, "B held every key A reads");
        break;
    }
}

/// Guards `session/cached.rs` (L1 follows the loss policy) and
/// `fill::FillPolicy::stale` for stale-if-error: with the bus down under
/// `bypass` and then Redis gone, an entry well within its rule's
/// `stale_if_error` window is not served (a peer's writes may have been
/// missed), as no L1 entry is then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_is_never_served_while_the_bus_is_down_under_bypass() {
    let ttl = Duration::from_millis(300);
    let mut c = Cluster::start_with(1, |cfg| {
        cfg.cache.rules = vec![RuleConfig {
            stale_if_error: Some(Dur(Duration::from_secs(60))),
            ..rule("t:", ttl)
        }];
        cfg.upstream.connect_timeout = Dur(Duration::from_millis(200));
    })
    .await;
    c.expect_log(BUS_LOST)
        .expect_log(UPSTREAM_LOST)
        .expect_log(UPSTREAM_CONNECT_FAILED);
    set_direct(&c.redis, "t:k", "v");
    cache_it(&mut c.conns[0], &c.redis, "t:k").await;
    let filled = Instant::now();
    c.nats.kill();
    until_bus(
        &mut c.conns[0],
        "the bus to be seen down",
        POLL_LIMIT,
        |s| s.get("healthy") == 0,
    )
    .await;
    c.redis.kill();
    // Past the TTL, deep inside the stale window (no event to wait for: it
    // is time itself that must pass).
    tokio::time::sleep(ttl.saturating_sub(filled.elapsed()) + Duration::from_millis(50)).await;
    let read: redis::RedisResult<Option<String>> = c.conns[0].get("t:k").await;
    assert!(read.is_err(), "served with the bus down: {read:?}");
    let mut fresh = c.proxies[0].conn().await;
    let stats = proxy_stats(&mut fresh).await;
    assert_eq!(stats["rules.prefix:t:.stale_hits"], 0, "{stats:?}");
}

/// Guards `Bus::l1_usable` (serve-stale): L1 is served for `max_staleness`
/// after the bus goes down, then bypassed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stale_serves_l1_only_up_to_max_staleness() {
    let max_staleness = Duration::from_secs(1);
    let mut c = Cluster::start_with(2, |cfg| {
        cfg.coherence.loss_policy = LossPolicy::ServeStale;
        cfg.coherence.max_staleness = Dur(max_staleness);
    })
    .await;
    // Killing NATS: every instance loses the bus and stops hearing its peer.
    c.expect_log(BUS_LOST).expect_log(PEER_SILENT);
    set_direct(&c.redis, "t:k", "v");
    cache_it(&mut c.conns[1], &c.redis, "t:k").await;

    c.nats.kill();
    until_bus(&mut c.conns[1], "B to see NATS go", POLL_LIMIT, |s| {
        s.get("healthy") == 0
    })
    .await;
    let noticed = Instant::now();
    let calls = upstream_reads(&mut c.conns[1], &c.redis, "t:k", "v", 1).await;
    let checked = noticed.elapsed();
    assert!(
        checked < max_staleness,
        "the check took {checked:?}, longer than max_staleness: inconclusive"
    );
    assert_eq!(
        calls, 0,
        "right after the bus went down, serve-stale must still serve L1"
    );

    // Let max_staleness elapse (generously), then L1 must be bypassed.
    tokio::time::sleep(max_staleness * 2).await;
    assert_eq!(
        c.bus(1).await.get("healthy"),
        0,
        "NATS is still down, the bus must still be unhealthy"
    );
    assert_eq!(
        upstream_reads(&mut c.conns[1], &c.redis, "t:k", "v", 3).await,
        3,
        "past max_staleness every read must go upstream"
    );
}

/// A client of our own on the bus subject, to send crafted messages.
async fn fake_peer(c: &Cluster) -> (async_nats::Client, String) {
    let client = async_nats::connect(c.nats.url()).await.unwrap();
    (client, c.cfg.coherence.subject())
}

async fn send(client: &async_nats::Client, subject: &str, payload: Bytes) {
    client.publish(subject.to_owned(), payload).await.unwrap();
    client.flush().await.unwrap();
}

fn keys_message(instance: &str, seq: u64, key: &str) -> Message {
    Message {
        kind: Kind::Keys,
        instance: instance.into(),
        seq,
        sent_at_us: now_us(),
        entries: vec![(0, Bytes::copy_from_slice(key.as_bytes()))],
    }
}

/// Guards `receive`'s per-peer sequence check: a skipped sequence number
/// flushes L1; a contiguous one does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_gap_flushes_l1() {
    // The fake peer sends two messages and no heartbeats: a long
    // peer_timeout keeps its silence from flushing L1 in between.
    let mut c = Cluster::start_with(2, |cfg| {
        cfg.coherence.peer_timeout = Dur(Duration::from_secs(30));
    })
    .await;
    // What the test is about: B must see (and A, also listening, may).
    let fake_gap = "invalidation gap; flushing L1 peer=fake expected=2 got=3";
    c.expect_log(fake_gap).proxies[1].must_log(fake_gap);
    set_direct(&c.redis, "t:k", "v");
    cache_it(&mut c.conns[1], &c.redis, "t:k").await;
    let (client, subject) = fake_peer(&c).await;
    let b0 = c.bus(1).await;

    // seq 1 from a new peer, about an unrelated key: no gap, t:k stays.
    send(
        &client,
        &subject,
        keys_message("fake", 1, "t:unrelated").encode(),
    )
    .await;
    let b1 = until_bus(&mut c.conns[1], "B to receive seq 1", POLL_LIMIT, |s| {
        s.get("delay_samples") > b0.get("delay_samples")
    })
    .await;
    assert_eq!(b1.get("gaps"), b0.get("gaps"), "seq 1 is no gap: {b1:?}");
    assert_eq!(b1.get("flushes"), b0.get("flushes"), "{b1:?}");
    assert_eq!(
        upstream_reads(&mut c.conns[1], &c.redis, "t:k", "v", 1).await,
        0,
        "t:k must still be cached after an unrelated invalidation"
    );

    // seq 3: seq 2 was lost, anything might be stale.
    send(
        &client,
        &subject,
        keys_message("fake", 3, "t:unrelated").encode(),
    )
    .await;
    let b2 = until_bus(&mut c.conns[1], "B to see the gap", POLL_LIMIT, |s| {
        s.get("gaps") > b1.get("gaps")
    })
    .await;
    assert_eq!(b2.get("gaps"), b1.get("gaps") + 1, "{b2:?}");
    assert!(b2.get("flushes") > b1.get("flushes"), "{b2:?}");
    assert_eq!(
        upstream_reads(&mut c.conns[1], &c.redis, "t:k", "v", 2).await,
        1,
        "after a gap t:k must be re-fetched (once)"
    );
}

/// Guards `receive`'s decode-error path: a message of another format version
/// flushes L1 instead of being ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_message_flushes_l1() {
    let mut c = Cluster::start(2).await;
    let unreadable = "unreadable invalidation message; flushing L1 error=message version 2";
    c.expect_log(unreadable).proxies[1].must_log(unreadable);
    set_direct(&c.redis, "t:k", "v");
    cache_it(&mut c.conns[1], &c.redis, "t:k").await;
    let (client, subject) = fake_peer(&c).await;
    let b0 = c.bus(1).await;

    let mut v2 = BytesMut::from(&keys_message("future", 1, "t:unrelated").encode()[..]);
    assert_eq!(v2[2], 1, "byte 2 is the version");
    v2[2] = 2;
    send(&client, &subject, v2.freeze()).await;
    let b1 = until_bus(&mut c.conns[1], "B to flush", POLL_LIMIT, |s| {
        s.get("flushes") > b0.get("flushes")
    })
    .await;
    assert_eq!(b1.get("flushes"), b0.get("flushes") + 1, "{b1:?}");
    assert_eq!(
        upstream_reads(&mut c.conns[1], &c.redis, "t:k", "v", 2).await,
        1,
        "after an unreadable message t:k must be re-fetched (once)"
    );
}

/// Guards `DecodeError::NewerKind` in `receive`: a message of a kind from a
/// later build flushes L1 once, and its sequence number counts, so the
/// peer's next message is no gap (no second flush).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_of_a_newer_kind_flushes_once_and_leaves_no_gap() {
    let mut c = Cluster::start(2).await;
    let newer = "unreadable invalidation message; flushing L1 error=message kind 200";
    c.expect_log(newer).proxies[1].must_log(newer);
    // The fake peer, known by its readable header, sends no heartbeats.
    c.expect_log(&format!("{PEER_SILENT} peer=future"));
    let (client, subject) = fake_peer(&c).await;
    let b0 = c.bus(1).await;

    let mut newer = BytesMut::from(&keys_message("future", 1, "t:x").encode()[..]);
    assert_eq!(newer[3], Kind::Keys as u8, "byte 3 is the kind");
    newer[3] = 200;
    send(&client, &subject, newer.freeze()).await;
    until_bus(&mut c.conns[1], "B to flush", POLL_LIMIT, |s| {
        s.get("flushes") > b0.get("flushes")
    })
    .await;
    send(&client, &subject, keys_message("future", 2, "t:y").encode()).await;
    let b1 = until_bus(&mut c.conns[1], "B to apply seq 2", POLL_LIMIT, |s| {
        s.get("applied_keys") > b0.get("applied_keys")
    })
    .await;
    assert_eq!(b1.get("flushes"), b0.get("flushes") + 1, "{b1:?}");
    assert_eq!(b1.get("gaps"), b0.get("gaps"), "{b1:?}");
}

/// Guards `receive`'s delay accounting and `PROXY STATS` bus.delay_*.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_apply_delay_is_recorded() {
    let mut c = Cluster::start(2).await;
    let a0 = c.bus(0).await;
    let b0 = c.bus(1).await;
    for i in 0..20 {
        let () = c.conns[0].set(format!("t:d{i}"), i).await.unwrap();
    }
    let a1 = until_bus(&mut c.conns[0], "A to publish", POLL_LIMIT, |s| {
        s.get("published_keys") >= a0.get("published_keys") + 20
    })
    .await;
    let sent = a1.get("published") - a0.get("published");
    let b1 = until_bus(&mut c.conns[1], "B to receive", POLL_LIMIT, |s| {
        s.get("received") >= b0.get("received") + sent
    })
    .await;
    // Heartbeats are not invalidations: only A's key messages are sampled.
    let samples = b1.get("delay_samples") - b0.get("delay_samples");
    assert!(samples >= 1, "no delay sample for {sent} messages: {b1:?}");
    assert!(b1.get("delay_max_us") > 0, "{b1:?}");
    assert!(b1.get("delay_avg_us") > 0, "{b1:?}");
    assert!(
        b1.get("delay_p50_us") <= b1.get("delay_p99_us")
            && b1.get("delay_p99_us") <= b1.get("delay_max_us"),
        "quantiles out of order: {b1:?}"
    );
    assert!(
        b1.get("delay_avg_us") < 50_000,
        "average publish-to-apply delay {} µs: {b1:?}",
        b1.get("delay_avg_us")
    );
    assert!(
        b1.get("delay_max_us") >= b1.get("delay_avg_us"),
        "max below average: {b1:?}"
    );
}

/// With `redis_tracking`, Redis's own invalidations reach L1: a value changed
/// directly on Redis (bypassing nearcache) stops being served long before the
/// rule's 60 s TTL, and a FLUSHALL made directly empties L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tracking_drops_values_written_directly_to_redis() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.cache.rules.push(rule("t:", Duration::from_secs(60)));
    // Nested prefixes (Redis refuses overlapping BCAST prefixes, so nearcache
    // must send only "t:") and a pattern rule under the same prefix.
    cfg.cache.rules.push(rule("t:k:", Duration::from_secs(60)));
    let mut candles = rule("", Duration::from_secs(60));
    candles.pattern = Some("t:*:1m".into());
    cfg.cache.rules.push(candles);
    cfg.coherence.redis_tracking = true;
    let proxy = TestProxy::start_with(cfg).await;
    let mut c = proxy.conn().await;

    // Tracking is enabled in the background, then L1 is flushed: wait until
    // nearcache reports it active (which it does after that flush, so no
    // flush can land between the two reads of `cache_it` below).
    until_stat(
        &mut c,
        "redis_tracking",
        "redis tracking to be active",
        |n| n == 1,
    )
    .await;
    // Redis agrees: a broadcast-tracking client (flags t and B).
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut redis.direct())
        .unwrap();
    assert!(
        clients.lines().any(|l| l.contains("flags=tB")),
        "no tracking client registered: {clients}"
    );

    // Redis broadcasts every write under a tracked prefix, this one too:
    // wait for it, since an invalidation that lands while a read of the key
    // is on its way to Redis rightly keeps that read out of L1.
    set_direct(&redis, "t:k", "old");
    until_stat(
        &mut c,
        "redis_tracking_keys",
        "Redis's invalidation of t:k",
        |n| n >= 1,
    )
    .await;
    assert_eq!(cache_it(&mut c, &redis, "t:k").await, "old");
    set_direct(&redis, "t:k", "new");
    let written = Instant::now();
    loop {
        if get(&mut c, "t:k").await.as_deref() == Some("new") {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(2),
            "L1 still serves the old value {:?} after a direct write (rule ttl is 60 s)",
            written.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    assert_eq!(cache_it(&mut c, &redis, "t:k").await, "new");
    let _: () = redis::cmd("FLUSHALL").query(&mut redis.direct()).unwrap();
    let flushed = Instant::now();
    while get(&mut c, "t:k").await.is_some() {
        assert!(
            flushed.elapsed() < Duration::from_secs(2),
            "L1 still serves t:k after a direct FLUSHALL"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.shutdown().await;
}

// ------------------------------------------------ the upstream is reborn

/// What Redis holds after it restarts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reborn {
    /// Nothing (no persistence, or a lost disk).
    Empty,
    /// Another dataset (a restore, or a failover to a server behind): the
    /// even keys with other values, the odd ones absent.
    Other,
}

/// How many keys the restart tests cache.
const REBORN_KEYS: usize = 40;

impl Reborn {
    /// What key `i` holds after the restart.
    fn value(self, i: usize) -> Option<String> {
        (self == Reborn::Other && i % 2 == 0).then(|| format!("new-{i}"))
    }
}

/// One read of the load: when it was sent, which key, what came back
/// (None: an error, which an outage may give).
type Read = (Instant, usize, Option<Option<String>>);

/// Reads every key in turn through `client` until `stop`, reconnecting
/// after an error (bounded: at most 100 000 reads), counting them in
/// `done`.
async fn read_load(
    client: redis::Client,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> Vec<Read> {
    let mut reads = Vec::new();
    let mut conn: Option<MultiplexedConnection> = None;
    for n in 0..100_000 {
        if stop.load(SeqCst) {
            break;
        }
        if conn.is_none() {
            conn = client.get_multiplexed_async_connection().await.ok();
        }
        let Some(c) = conn.as_mut() else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let i = n % REBORN_KEYS;
        let sent = Instant::now();
        let got: redis::RedisResult<Option<String>> = c.get(format!("t:{i}")).await;
        if got.is_err() {
            conn = None;
        }
        reads.push((sent, i, got.ok()));
        done.fetch_add(1, SeqCst);
    }
    reads
}

/// Waits (bounded) until every counter of `done` is at least `want`'s.
async fn until_read(done: &[Arc<AtomicUsize>], want: &[usize]) {
    let deadline = Instant::now() + POLL_LIMIT;
    while done.iter().zip(want).any(|(d, w)| d.load(SeqCst) < *w) {
        assert!(
            Instant::now() < deadline,
            "the load stalled: {done:?} of {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Guards `Upstream::observe` (the identity each new connection learns
/// from `INFO`) and the hook that flushes L1 and publishes a flush:
/// under load through two instances, Redis is killed and restarted
/// `reborn`; once an instance has a reply from the new server, no read
/// through it may return a value the old one held. Without the check, L1
/// would serve every key's old value for the rule's 60 s.
async fn an_upstream_reborn_is_never_read_through_old_l1_entries(reborn: Reborn) {
    let mut c = Cluster::start(2).await;
    c.expect_log("upstream connection lost")
        .expect_log("upstream connect failed")
        .expect_log("the upstream is another server now");
    for i in 0..REBORN_KEYS {
        set_direct(&c.redis, &format!("t:{i}"), &format!("old-{i}"));
    }
    // The other dataset, made by a server of its own and saved to a file.
    let other = (reborn == Reborn::Other).then(|| {
        let other = RedisServer::start();
        for i in 0..REBORN_KEYS {
            if let Some(v) = reborn.value(i) {
                set_direct(&other, &format!("t:{i}"), &v);
            }
        }
        (other.save(), other)
    });
    for conn in &mut c.conns {
        for i in 0..REBORN_KEYS {
            assert_eq!(
                cache_it(conn, &c.redis, &format!("t:{i}")).await,
                format!("old-{i}")
            );
        }
    }
    let flushes_before = [c.bus(0).await.get("flushes"), c.bus(1).await.get("flushes")];

    let stop = Arc::new(AtomicBool::new(false));
    let done: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::default()).collect();
    let load: Vec<_> = c
        .proxies
        .iter()
        .zip(&done)
        .map(|(p, d)| tokio::spawn(read_load(p.client(), stop.clone(), d.clone())))
        .collect();
    until_read(&done, &[REBORN_KEYS; 2]).await;
    match &other {
        None => c.redis.restart(),
        Some((rdb, _)) => c.redis.restart_with_dataset(rdb),
    }
    // When each instance first has a reply from the new server: the
    // connection that carried it was checked, so L1 was flushed before.
    let mut knew = Vec::new();
    for conn in &mut c.conns {
        let deadline = Instant::now() + POLL_LIMIT;
        loop {
            let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(conn).await;
            if pong.is_ok_and(|p| p == "PONG") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no PONG from the restarted Redis"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        knew.push(Instant::now());
    }
    let now: Vec<usize> = done
        .iter()
        .map(|d| d.load(SeqCst) + 2 * REBORN_KEYS)
        .collect();
    until_read(&done, &now).await;
    stop.store(true, SeqCst);

    for (who, task) in load.into_iter().enumerate() {
        let reads = task.await.unwrap();
        let after: Vec<_> = reads
            .iter()
            .filter(|(sent, ..)| *sent > knew[who])
            .collect();
        assert!(
            after.len() >= REBORN_KEYS,
            "inst-{who}: only {} reads after the restart",
            after.len()
        );
        for (_, i, got) in &after {
            if let Some(got) = got {
                assert_eq!(
                    *got,
                    reborn.value(*i),
                    "inst-{who}: t:{i} read a value the restarted Redis ({reborn:?}) does not hold"
                );
            }
        }
        let old = reads
            .iter()
            .filter(|(_, i, got)| matches!(got, Some(Some(v)) if *v == format!("old-{i}")))
            .count();
        assert!(old > 0, "inst-{who}: no read before the restart was served");
    }
    for (i, (conn, before)) in c.conns.iter_mut().zip(flushes_before).enumerate() {
        assert!(
            proxy_stats(conn).await["upstream.identity_changes"] >= 1,
            "inst-{i} counts the new server"
        );
        // Each published a flush, which the other applied.
        until_bus(conn, "the peer's flush", POLL_LIMIT, |s| {
            s.get("flushes") > before
        })
        .await;
        for k in 0..REBORN_KEYS {
            assert_eq!(get(conn, &format!("t:{k}")).await, reborn.value(k));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_is_never_read_through_old_l1_entries() {
    an_upstream_reborn_is_never_read_through_old_l1_entries(Reborn::Empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_with_another_dataset_is_never_read_through_old_l1_entries() {
    an_upstream_reborn_is_never_read_through_old_l1_entries(Reborn::Other).await;
}

/// The same on one instance without a bus: its own check flushes L1 (no
/// peer's flush can).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_instance_flushes_l1_when_redis_restarts_empty() {
    let mut redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.cache.rules = vec![rule("t:", Duration::from_secs(60))];
    let proxy = TestProxy::start_with(cfg).await;
    proxy
        .expect_log("upstream connection lost")
        .expect_log("upstream connect failed")
        .must_log("the upstream is another server now");
    let mut conn = proxy.conn().await;
    set_direct(&redis, "t:1", "old");
    assert_eq!(cache_it(&mut conn, &redis, "t:1").await, "old");
    redis.restart();
    let mut fresh = proxy.conn().await;
    let deadline = Instant::now() + POLL_LIMIT;
    while redis::cmd("PING")
        .query_async::<String>(&mut fresh)
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "no PONG from the restarted Redis"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        get(&mut fresh, "t:1").await,
        None,
        "L1 kept the old server's value"
    );
    assert_eq!(
        proxy_stats(&mut fresh).await["upstream.identity_changes"],
        1
    );
}
