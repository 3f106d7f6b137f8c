//! The staleness checker for NATS coherence: three `nearcache` binaries in
//! front of one Redis, sharing one nats-server, under concurrent writers and
//! readers on a shared set of hot keys; then every read is checked against
//! the writers' log of acknowledged versions.
//!
//! - **Writers**: key `hot:i` has exactly one writer, through instance
//!   `i % 3`, writing a strictly increasing version; after each `SET` reply
//!   it records (version, ack time). Every other key's writer is a RESP3
//!   client with `CLIENT TRACKING on`, whose replies nearcache relays, so
//!   relayed writes are checked too.
//! - **Readers**: tasks reading random keys through each instance; each read
//!   records (key, instance, start, end, value). The start is taken just
//!   before the request is sent, so a read issued while an instance is paused
//!   is measured from when it was issued.
//!
//! Checked, for every read (all times on this process's monotonic clock):
//! - **Read your writes**: a read through the key's writer instance, started
//!   after a version's ack, returns that version or newer. Always 0.
//! - **Bounded staleness**: a read never returns a value older than a version
//!   acknowledged more than `bound` before the read started. The README's
//!   promise is "publish-to-apply delay" (~1 ms of batching plus delivery);
//!   the checker allows 100 ms ([`BOUND`]) so that scheduling hiccups on a
//!   busy machine are not reported, while a lost invalidation (stale for a
//!   whole 30 s TTL) or a late flush is. Measured with a healthy bus, the
//!   oldest stale value served was 4–42 ms (debug and release, 2 cores, also
//!   with two extra busy loops), so the short CI test keeps 100 ms too.
//!
//! Reported: the "observed propagation delay": for each version and each
//! instance other than the writer's, the time from the ack to the end of the
//! first read on that instance, started after the ack, that returned that
//! version or newer (an upper bound on when the version became visible there).
//!
//! Phases, each with the same invariants: a healthy run; NATS killed for the
//! middle third of the run and restarted (loss policy `bypass`: L1 is not
//! served while the bus is down, and is flushed when it returns); one proxy
//! paused (SIGSTOP) for about a second and resumed.
//!
//! `scripts/coherence-check.sh [SECONDS]` runs the `#[ignore]`d long variant.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

use crate::support::{BUS_LOST, GAP, NatsServer, PEER_SILENT, ProxyProcess, RedisServer, pairs};

/// The staleness bound while the bus is healthy (see the module docs).
const BOUND: Duration = Duration::from_millis(100);

/// The bound while a writer instance is frozen: a write it acknowledged but
/// never published is covered when peers notice its silence — after
/// `coherence.peer_timeout` (100 ms) plus the 25 ms check interval, plus
/// scheduling on a loaded 2-core machine. Measured: 100 ms was exceeded by a
/// few reads under the full test suite's load, never by more than ~200 ms.
const PAUSED_BOUND: Duration = Duration::from_millis(300);

const INSTANCES: usize = 3;
const KEYS: usize = 8;
const READERS_PER_INSTANCE: usize = 2;
/// Pause between a writer's SETs, so that reads between two writes of a key
/// can be served from L1 (a key rewritten continuously would never be cached,
/// and an uncached read cannot be stale).
const WRITE_PAUSE: Duration = Duration::from_millis(2);
/// How long one request may take before it counts as an error (the paused
/// instance's requests take about the pause).
const OP_LIMIT: Duration = Duration::from_secs(10);
/// How long a bounded poll may wait for the proxies (or the bus).
const POLL_LIMIT: Duration = Duration::from_secs(20);
/// Violations described in full per kind.
const DETAILS: usize = 5;

/// Which instance writes key `i`.
fn writer_of(key: usize) -> usize {
    key % INSTANCES
}

fn key_name(key: usize) -> String {
    format!("hot:{key}")
}

// ------------------------------------------------------------ PROXY STATS

/// What the checker reads of `PROXY STATS`: L1 hits (all rules) and the
/// `bus` counters.
#[derive(Debug, Clone, Default)]
struct Stats {
    hits: i64,
    bus: HashMap<String, i64>,
}

impl Stats {
    fn bus(&self, name: &str) -> i64 {
        *self
            .bus
            .get(name)
            .unwrap_or_else(|| panic!("no bus.{name} in {self:?}"))
    }
}

async fn proxy_stats(c: &mut MultiplexedConnection) -> Stats {
    let v: Value = redis::cmd("PROXY")
        .arg("STATS")
        .query_async(c)
        .await
        .unwrap();
    let mut stats = Stats::default();
    for (k, v) in pairs(&v) {
        match k.as_str() {
            "bus" => {
                for (name, value) in pairs(&v) {
                    if let Value::Int(n) = value {
                        stats.bus.insert(name, n);
                    }
                }
            }
            "rules" => {
                let Value::Array(rules) = v else {
                    panic!("rules: {v:?}")
                };
                for rule in &rules {
                    for (name, value) in pairs(rule) {
                        if let ("hits", Value::Int(n)) = (name.as_str(), value) {
                            stats.hits += n;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    stats
}

// ---------------------------------------------------------------- cluster

/// One Redis, one NATS, three `nearcache` binaries caching `hot:` for 30 s.
struct Cluster {
    /// First, so they are dropped (and their logs checked) before Redis and
    /// NATS go.
    proxies: Vec<ProxyProcess>,
    _redis: RedisServer,
    nats: NatsServer,
    /// One connection per proxy for PROXY commands.
    admin: Vec<MultiplexedConnection>,
    /// Each key's last acknowledged (version, ack time), carried into the next
    /// phase (what L1 may still hold is then checked against it too).
    last: Vec<(u64, Instant)>,
    _dir: tempfile::TempDir,
}

/// A connection without redis-rs's 500 ms response timeout (requests to a
/// paused proxy are meant to wait); the checker bounds each request itself.
async fn connect(port: u16) -> MultiplexedConnection {
    connect_to(format!("redis://127.0.0.1:{port}")).await
}

/// A writer's connection: for every other key, a RESP3 one with `CLIENT
/// TRACKING on`, whose replies nearcache relays rather than pairs (its
/// writes take another path to the other instances).
async fn connect_writer(port: u16, key: usize) -> MultiplexedConnection {
    if key % 2 == 0 {
        return connect(port).await;
    }
    let mut c = connect_to(format!("redis://127.0.0.1:{port}?protocol=resp3")).await;
    let () = redis::cmd("CLIENT")
        .arg(&["TRACKING", "on"])
        .query_async(&mut c)
        .await
        .unwrap();
    c
}

async fn connect_to(url: String) -> MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(
            &AsyncConnectionConfig::new()
                .set_response_timeout(None)
                .set_connection_timeout(Some(Duration::from_secs(5))),
        )
        .await
        .unwrap()
}

impl Cluster {
    async fn start() -> Self {
        let redis = RedisServer::start();
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("nearcache.toml");
        std::fs::write(
            &config,
            "[[cache.rules]]\nprefix = \"hot:\"\nttl = \"30s\"\n",
        )
        .unwrap();
        let config = config.to_str().unwrap().to_owned();
        let url = nats.url();
        let proxies: Vec<ProxyProcess> = (0..INSTANCES)
            .map(|i| {
                let id = format!("p{}", i + 1);
                tokio::task::block_in_place(|| {
                    ProxyProcess::start(
                        &redis,
                        &["--config", &config, "--nats", &url, "--instance-id", &id],
                    )
                })
            })
            .collect();
        let mut admin = Vec::new();
        for p in &proxies {
            admin.push(connect(p.port()).await);
        }
        let mut cluster = Cluster {
            _redis: redis,
            nats,
            proxies,
            admin,
            last: Vec::new(),
            _dir: dir,
        };
        cluster.until_healthy().await;
        cluster.introduce().await;
        // Version 1 of every key, through its writer.
        for key in 0..KEYS {
            let mut c = connect(cluster.proxies[writer_of(key)].port()).await;
            let () = redis::cmd("SET")
                .arg(key_name(key))
                .arg(1)
                .query_async(&mut c)
                .await
                .unwrap();
            cluster.last.push((1, Instant::now()));
        }
        cluster
    }

    async fn stats(&mut self) -> Vec<Stats> {
        let mut out = Vec::new();
        for c in &mut self.admin {
            out.push(proxy_stats(c).await);
        }
        out
    }

    /// Waits until every instance's bus is connected.
    async fn until_healthy(&mut self) {
        let deadline = Instant::now() + POLL_LIMIT;
        loop {
            let stats = self.stats().await;
            if stats.iter().all(|s| s.bus("healthy") == 1) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the buses did not all become healthy within {POLL_LIMIT:?}: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every instance publishes a no-match `PROXY INVALIDATE` until every peer
    /// has received one from it, so that no instance later takes a peer's
    /// first message for a gap (an instance started after a peer missed that
    /// peer's seq 1) and flushes in the middle of a run.
    async fn introduce(&mut self) {
        for i in 0..INSTANCES {
            let deadline = Instant::now() + POLL_LIMIT;
            'retry: loop {
                let before: Vec<i64> = self
                    .stats()
                    .await
                    .iter()
                    .map(|s| s.bus("delay_samples"))
                    .collect();
                let _: i64 = redis::cmd("PROXY")
                    .arg("INVALIDATE")
                    .arg(format!("nothing-matches-this-{i}"))
                    .query_async(&mut self.admin[i])
                    .await
                    .unwrap();
                let round = Instant::now() + Duration::from_secs(1);
                for j in (0..INSTANCES).filter(|&j| j != i) {
                    while proxy_stats(&mut self.admin[j]).await.bus("delay_samples") <= before[j] {
                        if Instant::now() > round {
                            assert!(
                                Instant::now() < deadline,
                                "p{} never received a message from p{}",
                                j + 1,
                                i + 1
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
}

// ------------------------------------------------------------------- runs

/// What happens in the middle of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// NATS killed for the middle third of the run, then restarted.
    NatsOutage,
    /// This instance SIGSTOPped for `min(1 s, run / 2)`, centred in the run.
    Pause(usize),
}

#[derive(Debug, Clone, Copy)]
struct Write {
    version: u64,
    ack: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Read {
    key: usize,
    instance: usize,
    start: Instant,
    end: Instant,
    /// `None`: the key did not exist (never expected: every key is set first).
    value: Option<u64>,
}

#[derive(Debug, Default)]
struct TaskLog {
    writes: Vec<Write>,
    reads: Vec<Read>,
    errors: u64,
    first_error: Option<String>,
}

impl TaskLog {
    fn error(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }
}

/// A tiny xorshift generator: which key a reader reads next.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

async fn writer(
    mut c: MultiplexedConnection,
    key: usize,
    mut version: u64,
    end: Instant,
) -> TaskLog {
    let mut log = TaskLog::default();
    let name = key_name(key);
    while Instant::now() < end {
        version += 1;
        let set = redis::cmd("SET").arg(&name).arg(version).clone();
        match tokio::time::timeout(OP_LIMIT, set.query_async::<()>(&mut c)).await {
            Ok(Ok(())) => log.writes.push(Write {
                version,
                ack: Instant::now(),
            }),
            Ok(Err(e)) => log.error(format!("SET {name} {version}: {e}")),
            Err(_) => log.error(format!("SET {name} {version}: no reply in {OP_LIMIT:?}")),
        }
        tokio::time::sleep(WRITE_PAUSE).await;
    }
    log
}

async fn reader(mut c: MultiplexedConnection, instance: usize, seed: u64, end: Instant) -> TaskLog {
    let mut log = TaskLog::default();
    let mut rng = Rng(seed | 1);
    while Instant::now() < end {
        let key = rng.below(KEYS);
        let get = redis::cmd("GET").arg(key_name(key)).clone();
        let start = Instant::now();
        let reply = tokio::time::timeout(OP_LIMIT, get.query_async::<Option<String>>(&mut c)).await;
        let done = Instant::now();
        match reply {
            Ok(Ok(value)) => match value.as_deref().map(str::parse::<u64>) {
                None => log.reads.push(Read {
                    key,
                    instance,
                    start,
                    end: done,
                    value: None,
                }),
                Some(Ok(v)) => log.reads.push(Read {
                    key,
                    instance,
                    start,
                    end: done,
                    value: Some(v),
                }),
                Some(Err(_)) => log.error(format!("GET hot:{key}: not a version: {value:?}")),
            },
            Ok(Err(e)) => log.error(format!("GET hot:{key} via p{}: {e}", instance + 1)),
            Err(_) => log.error(format!(
                "GET hot:{key} via p{}: no reply in {OP_LIMIT:?}",
                instance + 1
            )),
        }
    }
    log
}

/// Runs writers and readers for `duration` with `fault` in the middle, and
/// checks the logs against `bound`.
async fn run_phase(
    cluster: &mut Cluster,
    name: &'static str,
    fault: Fault,
    duration: Duration,
    bound: Duration,
) -> Report {
    let before = cluster.stats().await;
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    let mut conns = Vec::new();
    for key in 0..KEYS {
        conns.push(connect_writer(cluster.proxies[writer_of(key)].port(), key).await);
    }
    let mut reader_conns = Vec::new();
    for instance in 0..INSTANCES {
        for _ in 0..READERS_PER_INSTANCE {
            reader_conns.push((instance, connect(cluster.proxies[instance].port()).await));
        }
    }
    let t0 = Instant::now();
    let end = t0 + duration;
    for (key, c) in conns.into_iter().enumerate() {
        writers.push(tokio::spawn(writer(c, key, cluster.last[key].0, end)));
    }
    for (n, (instance, c)) in reader_conns.into_iter().enumerate() {
        let seed = 0x9E37_79B9_7F4A_7C15 ^ ((n as u64 + 1) << 32) ^ t0.elapsed().as_nanos() as u64;
        readers.push(tokio::spawn(reader(c, instance, seed, end)));
    }

    let mut fault_window = None;
    match fault {
        Fault::None => {}
        Fault::NatsOutage => {
            // Every instance loses the bus and stops hearing its peers; once
            // NATS is back, what peers published meanwhile shows as a gap.
            for p in &cluster.proxies {
                p.expect_log(BUS_LOST)
                    .expect_log(PEER_SILENT)
                    .expect_log(GAP);
            }
            tokio::time::sleep_until((t0 + duration / 3).into()).await;
            let down = Instant::now();
            cluster.nats.kill();
            tokio::time::sleep_until((t0 + duration * 2 / 3).into()).await;
            tokio::task::block_in_place(|| cluster.nats.restart());
            fault_window = Some((down, Instant::now()));
        }
        Fault::Pause(i) => {
            // Its peers stop hearing it, and see a gap when it is back; it
            // wakes to peers it has not heard from for the whole pause.
            let paused = format!("peer=p{}~", i + 1);
            for (j, p) in cluster.proxies.iter().enumerate() {
                if j == i {
                    p.expect_log(PEER_SILENT).expect_log(GAP);
                } else {
                    p.expect_log(&format!("{PEER_SILENT} {paused}"))
                        .expect_log(&format!("{GAP} {paused}"));
                }
            }
            let pause = (duration / 2).min(Duration::from_secs(1));
            tokio::time::sleep_until((t0 + duration / 2 - pause / 2).into()).await;
            let stopped = Instant::now();
            tokio::task::block_in_place(|| cluster.proxies[i].signal("STOP"));
            tokio::time::sleep(pause).await;
            tokio::task::block_in_place(|| cluster.proxies[i].signal("CONT"));
            fault_window = Some((stopped, Instant::now()));
        }
    }

    let mut writes: Vec<Vec<Write>> = cluster
        .last
        .iter()
        .map(|&(version, ack)| vec![Write { version, ack }])
        .collect();
    let mut reads = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    let mut fold = |mut log: TaskLog| {
        errors += log.errors;
        if first_error.is_none() {
            first_error = log.first_error.take();
        }
        log
    };
    for (key, w) in writers.into_iter().enumerate() {
        let log = fold(w.await.unwrap());
        writes[key].extend(log.writes);
    }
    for r in readers {
        reads.extend(fold(r.await.unwrap()).reads);
    }
    let run = t0.elapsed();
    if fault == Fault::NatsOutage {
        cluster.until_healthy().await;
    }
    let after = cluster.stats().await;
    for (key, w) in writes.iter().enumerate() {
        let last = w.last().unwrap();
        cluster.last[key] = (last.version, last.ack);
    }

    let mut report = analyze(&writes, &reads, t0, bound);
    report.name = name;
    report.run = run;
    report.errors = errors;
    report.first_error = first_error;
    report.fault = Some(fault);
    report.fault_window = fault_window.map(|(a, b)| (ms(a, t0), ms(b, t0)));
    report.hits = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.hits - b.hits)
        .collect();
    report.flushes = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.bus("flushes") - b.bus("flushes"))
        .collect();
    report.gaps = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.bus("gaps") - b.bus("gaps"))
        .collect();
    report.bus_delay_max_us = after.iter().map(|a| a.bus("delay_max_us")).collect();
    report
}

// --------------------------------------------------------------- analysis

/// Milliseconds from `t0` to `t` (negative before `t0`).
fn ms(t: Instant, t0: Instant) -> f64 {
    match t.checked_duration_since(t0) {
        Some(d) => d.as_secs_f64() * 1e3,
        None => -(t0.duration_since(t).as_secs_f64() * 1e3),
    }
}

#[derive(Debug, Default)]
struct Report {
    name: &'static str,
    fault: Option<Fault>,
    fault_window: Option<(f64, f64)>,
    bound: Duration,
    run: Duration,
    writes: usize,
    reads: usize,
    errors: u64,
    first_error: Option<String>,
    /// Reads through the key's writer instance that started after some ack.
    ryw_checked: usize,
    ryw_violations: usize,
    /// Reads that returned a value older than a version acked before they
    /// started (by any amount) / by more than the bound.
    stale_within_bound: usize,
    stale_beyond_bound: usize,
    /// The largest age of a stale value: read start minus the ack of the
    /// oldest version newer than the value.
    max_stale_age: Duration,
    /// Observed propagation delays (see the module docs).
    propagation: Vec<Duration>,
    unobserved: usize,
    /// Per instance: reads, longest read.
    reads_per_instance: Vec<usize>,
    max_read: Vec<Duration>,
    /// Per instance, over the phase: L1 hits, bus flushes and gaps; max
    /// publish-to-apply delay seen so far.
    hits: Vec<i64>,
    flushes: Vec<i64>,
    gaps: Vec<i64>,
    bus_delay_max_us: Vec<i64>,
    /// Stale reads beyond the bound per instance, and the first and last
    /// such read's start (ms from the phase start).
    beyond_per_instance: Vec<usize>,
    beyond_span: Option<(f64, f64)>,
    ryw_details: Vec<String>,
    stale_details: Vec<String>,
}

impl Fault {
    fn describe(self) -> String {
        match self {
            Fault::None => "none".into(),
            Fault::NatsOutage => "nats-server killed, then restarted".into(),
            Fault::Pause(i) => format!("p{} SIGSTOP, then SIGCONT", i + 1),
        }
    }
}

/// Checks `reads` against each key's log of acknowledged versions (`writes[k]`,
/// ascending; its first entry may predate the run).
fn analyze(writes: &[Vec<Write>], reads: &[Read], t0: Instant, bound: Duration) -> Report {
    let mut r = Report {
        bound,
        writes: writes.iter().map(|w| w.len().saturating_sub(1)).sum(),
        reads: reads.len(),
        reads_per_instance: vec![0; INSTANCES],
        max_read: vec![Duration::ZERO; INSTANCES],
        beyond_per_instance: vec![0; INSTANCES],
        ..Report::default()
    };
    let mut sorted: Vec<&Read> = reads.iter().collect();
    sorted.sort_by_key(|r| r.start);
    for read in sorted {
        r.reads_per_instance[read.instance] += 1;
        let took = read.end - read.start;
        r.max_read[read.instance] = r.max_read[read.instance].max(took);
        let log = &writes[read.key];
        let value = read.value.unwrap_or(0);
        let own = read.instance == writer_of(read.key);
        if own && log.first().is_some_and(|w| w.ack < read.start) {
            r.ryw_checked += 1;
        }
        // The oldest acknowledged version newer than what the read returned.
        let newer = log.partition_point(|w| w.version <= value);
        let Some(w) = log.get(newer).filter(|w| w.ack < read.start) else {
            continue;
        };
        let age = read.start - w.ack;
        r.max_stale_age = r.max_stale_age.max(age);
        let newest = log[..log.partition_point(|w| w.ack < read.start)]
            .last()
            .unwrap();
        let detail = || {
            format!(
                "GET hot:{} via p{} (writer p{}) started {:.3} ms, ended {:.3} ms, \
                 returned {}; version {} was acked at {:.3} ms ({:.3} ms before the read \
                 started); newest acked before the read: {} at {:.3} ms",
                read.key,
                read.instance + 1,
                writer_of(read.key) + 1,
                ms(read.start, t0),
                ms(read.end, t0),
                read.value.map_or("nil".into(), |v| v.to_string()),
                w.version,
                ms(w.ack, t0),
                age.as_secs_f64() * 1e3,
                newest.version,
                ms(newest.ack, t0),
            )
        };
        if own {
            r.ryw_violations += 1;
            if r.ryw_details.len() < DETAILS {
                r.ryw_details.push(detail());
            }
        }
        if age > bound {
            r.stale_beyond_bound += 1;
            r.beyond_per_instance[read.instance] += 1;
            let at = ms(read.start, t0);
            r.beyond_span = Some(r.beyond_span.map_or((at, at), |(a, _)| (a, at)));
            if r.stale_details.len() < DETAILS {
                r.stale_details.push(detail());
            }
        } else {
            r.stale_within_bound += 1;
        }
    }

    // Propagation: per key and other instance, reads in start order.
    let mut by: HashMap<(usize, usize), Vec<&Read>> = HashMap::new();
    for read in reads {
        by.entry((read.key, read.instance)).or_default().push(read);
    }
    for list in by.values_mut() {
        list.sort_by_key(|r| r.start);
    }
    for (key, log) in writes.iter().enumerate() {
        for instance in (0..INSTANCES).filter(|&i| i != writer_of(key)) {
            let list = by.get(&(key, instance)).map_or(&[][..], Vec::as_slice);
            let mut from = 0;
            for w in log.iter().filter(|w| w.ack >= t0) {
                while from < list.len() && list[from].start < w.ack {
                    from += 1;
                }
                match list[from..]
                    .iter()
                    .find(|r| r.value.is_some_and(|v| v >= w.version))
                {
                    Some(read) => r.propagation.push(read.end - w.ack),
                    None => r.unobserved += 1,
                }
            }
        }
    }
    r.propagation.sort();
    r
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== phase {}: {:.2} s, fault: {}{}, bound {}",
            self.name,
            self.run.as_secs_f64(),
            self.fault.map_or("none".into(), Fault::describe),
            self.fault_window
                .map_or(String::new(), |(a, b)| format!(" ({a:.0}–{b:.0} ms)")),
            fmt_ms(self.bound),
        );
        let _ = writeln!(
            s,
            "   writes {}  reads {} (per instance {:?})  errors {}{}",
            self.writes,
            self.reads,
            self.reads_per_instance,
            self.errors,
            self.first_error
                .as_ref()
                .map_or(String::new(), |e| format!(" (first: {e})")),
        );
        let _ = writeln!(
            s,
            "   L1 hits per instance {:?}  bus flushes {:?}  gaps {:?}  bus delay_max_us {:?}",
            self.hits, self.flushes, self.gaps, self.bus_delay_max_us
        );
        let _ = writeln!(
            s,
            "   read-your-writes: {} checked, {} violations",
            self.ryw_checked, self.ryw_violations
        );
        let _ = writeln!(
            s,
            "   stale reads: {} beyond the bound (per instance {:?}{}), {} within it; \
             oldest stale value {}",
            self.stale_beyond_bound,
            self.beyond_per_instance,
            self.beyond_span.map_or(String::new(), |(a, b)| format!(
                ", reads started {a:.1}–{b:.1} ms"
            )),
            self.stale_within_bound,
            fmt_ms(self.max_stale_age)
        );
        let _ = writeln!(
            s,
            "   propagation to other instances ({} samples, {} unobserved): p50 {}  p99 {}  max {}",
            self.propagation.len(),
            self.unobserved,
            fmt_ms(percentile(&self.propagation, 50)),
            fmt_ms(percentile(&self.propagation, 99)),
            fmt_ms(self.propagation.last().copied().unwrap_or_default()),
        );
        let _ = writeln!(
            s,
            "   longest read per instance: {}",
            self.max_read
                .iter()
                .map(|d| fmt_ms(*d))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for d in &self.ryw_details {
            let _ = writeln!(s, "   VIOLATION read-your-writes: {d}");
        }
        for d in &self.stale_details {
            let _ = writeln!(s, "   VIOLATION stale beyond the bound: {d}");
        }
        f.write_str(s.trim_end())
    }
}

/// Starts the cluster and runs the three phases, `per_phase` each; asserts
/// the invariants (after printing every report). `bound` applies to every
/// phase.
async fn check(per_phase: Duration, bound: Duration) -> Vec<Report> {
    let mut cluster = Cluster::start().await;
    let phases = [
        ("1 healthy", Fault::None),
        ("2 nats outage", Fault::NatsOutage),
        ("3 paused proxy", Fault::Pause(2)),
    ];
    let mut reports = Vec::new();
    for (name, fault) in phases {
        let phase_bound = match fault {
            Fault::Pause(_) => bound.max(PAUSED_BOUND),
            _ => bound,
        };
        let report = run_phase(&mut cluster, name, fault, per_phase, phase_bound).await;
        eprintln!("{report}");
        reports.push(report);
    }
    // Stop the servers before asserting: a panic would otherwise dump every
    // proxy's (debug-level) log; the reports above say what went wrong.
    drop(cluster);

    // Not vacuous: work happened, cross-instance reads saw new versions, and
    // L1 served reads (only an L1 hit can be stale).
    let min_ops = (per_phase.as_millis() / 10) as usize; // ≥ 100/s
    for r in &reports {
        assert!(
            r.writes >= min_ops,
            "phase {}: only {} writes",
            r.name,
            r.writes
        );
        assert!(
            r.reads >= min_ops,
            "phase {}: only {} reads",
            r.name,
            r.reads
        );
        assert!(
            r.reads_per_instance.iter().all(|&n| n > 0),
            "phase {}: an instance served no reads: {:?}",
            r.name,
            r.reads_per_instance
        );
        assert!(
            r.ryw_checked > 0,
            "phase {}: no read-your-writes check",
            r.name
        );
        assert!(
            !r.propagation.is_empty(),
            "phase {}: no propagation seen",
            r.name
        );
    }
    let healthy = &reports[0];
    assert!(
        healthy.hits.iter().all(|&h| h > 0),
        "phase 1: every instance must serve some reads from L1: hits {:?}",
        healthy.hits
    );
    assert_eq!(
        healthy.errors, 0,
        "phase 1: error replies: {:?}",
        healthy.first_error
    );
    // The outage was seen: every instance flushed when the bus returned.
    assert!(
        reports[1].flushes.iter().all(|&f| f > 0),
        "phase 2: an instance did not flush after NATS returned: {:?}",
        reports[1].flushes
    );
    // The pause held requests: some read through the paused proxy waited.
    assert!(
        reports[2].max_read[2] >= Duration::from_millis(300),
        "phase 3: no read through p3 waited for the pause: {:?}",
        reports[2].max_read
    );

    for r in &reports {
        assert_eq!(
            r.ryw_violations, 0,
            "phase {}: read-your-writes violated (see the VIOLATION lines above)",
            r.name
        );
        assert_eq!(
            r.stale_beyond_bound, 0,
            "phase {}: stale reads beyond {:?} (see the VIOLATION lines above)",
            r.name, r.bound
        );
    }
    reports
}

// ------------------------------------------------------------------ tests

/// The checker, short (CI runs it on 2 cores): three phases of ~2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_serve_no_stale_reads_beyond_the_bound() {
    check(Duration::from_secs(2), BOUND).await;
}

/// The checker, long: `COHERENCE_SECONDS` (default 30) per phase. Run by
/// `scripts/coherence-check.sh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by scripts/coherence-check.sh"]
async fn coherence_check_long() {
    let secs: u64 = std::env::var("COHERENCE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    check(Duration::from_secs(secs), BOUND).await;
}

/// The analysis itself flags what it must (so a clean report means something):
/// a stale read on another instance, and an old value on the writer's own.
#[test]
fn the_analysis_flags_stale_reads_and_read_your_writes_violations() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    // Key 1 is written through p2 (index 1): v1 before the run, v2 at 10 ms.
    let mut writes = vec![vec![]; KEYS];
    writes[1] = vec![
        Write {
            version: 1,
            ack: t0,
        },
        Write {
            version: 2,
            ack: at(10),
        },
    ];
    for (k, w) in writes.iter_mut().enumerate() {
        if k != 1 {
            w.push(Write {
                version: 1,
                ack: t0,
            });
        }
    }
    let read = |instance, start, value| Read {
        key: 1,
        instance,
        start: at(start),
        end: at(start + 1),
        value: Some(value),
    };
    let reads = [
        read(0, 50, 1),  // stale, within the bound
        read(0, 200, 1), // stale beyond the bound
        read(2, 300, 2), // fresh: propagation 291 ms to p3
        read(1, 11, 1),  // p2 wrote v2 at 10 ms: read-your-writes violated
    ];
    let r = analyze(&writes, &reads, t0 + Duration::from_millis(1), BOUND);
    assert_eq!(r.stale_within_bound, 2, "{r}");
    assert_eq!(r.stale_beyond_bound, 1, "{r}");
    assert_eq!(r.ryw_violations, 1, "{r}");
    assert_eq!(r.max_stale_age, Duration::from_millis(190));
    assert_eq!(r.propagation, vec![Duration::from_millis(291)], "{r}");
    assert_eq!(r.unobserved, 1, "p1 never read v2: {r}");
}
