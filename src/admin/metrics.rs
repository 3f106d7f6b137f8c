//! `/metrics`: the stats registry as a Prometheus exposition, read at scrape
//! time by a [`Collector`]; the request path keeps recording into plain
//! atomics and knows nothing of this. Every metric name is in this file.
//!
//! Labels are bounded: rules by selector (from the configuration), commands
//! by class, errors by kind, latency by path; never a key.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::context::Context;
use crate::stats::{Histogram, Path};

/// Latency bucket bounds, seconds (the registry's finer buckets are merged
/// into these at scrape time).
const LATENCY_BOUNDS_S: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

/// Encodes every metric of the process.
pub fn encode(ctx: &Arc<Context>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatsCollector { ctx: ctx.clone() }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Reads `Context` on each scrape.
#[derive(Debug)]
struct StatsCollector {
    ctx: Arc<Context>,
}

fn n(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One counter family with a single label.
fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: impl IntoIterator<Item = (String, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, count) in values {
        let labels = [(label, value)];
        ConstCounter::new(count).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(m)
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    ConstGauge::new(value).encode(m)
}

/// The registry's µs histogram as seconds buckets: each fine bucket goes to
/// the first bound at or above its largest value, so no value is counted
/// under a bound it exceeds. Count is the buckets' sum, so it always equals
/// `+Inf` even while recording races the scrape.
fn rebucket(h: &Histogram) -> (f64, u64, Vec<(f64, u64)>) {
    let mut buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_S.iter().map(|&b| (b, 0)).collect();
    buckets.push((f64::MAX, 0));
    let mut count = 0;
    for (upper_us, k) in h.buckets() {
        let upper_s = upper_us as f64 / 1e6;
        let i = LATENCY_BOUNDS_S
            .iter()
            .position(|&b| upper_s <= b)
            .unwrap_or(LATENCY_BOUNDS_S.len());
        buckets[i].1 += k;
        count += k;
    }
    (h.sum() as f64 / 1e6, count, buckets)
}

impl Collector for StatsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ctx = &self.ctx;
        let req = &ctx.stats.requests;

        // Build.
        let m = enc.encode_descriptor(
            "nearcache_build_info",
            "The running build (value 1).",
            None,
            MetricType::Gauge,
        )?;
        {
            let mut m = m;
            let labels = [("version", env!("CARGO_PKG_VERSION"))];
            ConstGauge::new(1i64).encode(m.encode_family(&labels)?)?;
        }

        // Request path.
        counters(
            &mut enc,
            "nearcache_commands",
            "Commands handled, by class (from the command table).",
            "class",
            req.commands().map(|(c, v)| (c.name().to_owned(), v)),
        )?;
        counters(
            &mut enc,
            "nearcache_errors",
            "Errors nearcache answered with, by kind.",
            "kind",
            req.errors().map(|(k, v)| (k.name().to_owned(), v)),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "nearcache_reply_latency",
                "Reply latency from the read that brought the command to its reply being ready, by path.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for path in Path::ALL {
                let (sum, count, buckets) = rebucket(req.latency(path));
                let labels = [("path", path.name())];
                m.encode_family(&labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        sum, count, &buckets, None,
                    )?;
            }
        }
        if ctx.tls.is_some() {
            counters(
                &mut enc,
                "nearcache_tls_handshakes",
                "Client TLS handshakes, by outcome (ok, failed, timeout).",
                "outcome",
                ctx.stats
                    .tls
                    .outcomes()
                    .map(|(outcome, v)| (outcome.to_owned(), v)),
            )?;
        }
        gauge(
            &mut enc,
            "nearcache_clients_connected",
            "Clients connected now.",
            None,
            n(req.clients.load(Relaxed)),
        )?;
        gauge(
            &mut enc,
            "nearcache_clients_pinned",
            "Clients pinned to (or blocked on) a dedicated upstream connection now.",
            None,
            n(ctx.directory.pinned_count() as u64),
        )?;
        gauge(
            &mut enc,
            "nearcache_upstream_up",
            "1 while a shared connection to the upstream Redis is up.",
            None,
            i64::from(ctx.default_pool.any_shared_up()),
        )?;
        counter(
            &mut enc,
            "nearcache_upstream_outages",
            "Upstream outages begun: a shared connection lost, or not made, while no outage was going on.",
            ctx.upstream.outages.count(),
        )?;
        counter(
            &mut enc,
            "nearcache_upstream_reconnects",
            "Upstream outages that ended with a connection back.",
            ctx.upstream.outages.reconnects(),
        )?;
        gauge(
            &mut enc,
            "nearcache_upstream_circuit_state",
            "The upstream's circuit breaker: 0 closed, 1 open (requests needing a connection refused at once), 2 half-open.",
            None,
            ctx.upstream.breaker.state().code(),
        )?;
        counter(
            &mut enc,
            "nearcache_upstream_circuit_opened",
            "Times the upstream's circuit breaker opened.",
            ctx.upstream.breaker.opened(),
        )?;
        counter(
            &mut enc,
            "nearcache_warm_keys",
            "Keys warming filled L1 with (cache.warm), over every pass.",
            ctx.stats.warm.keys.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "nearcache_warm_passes",
            "Warming passes finished (at start and after every full flush).",
            ctx.stats.warm.passes.load(Relaxed),
        )?;
        gauge(
            &mut enc,
            "nearcache_warm_running",
            "1 while a warming pass runs.",
            None,
            i64::from(ctx.stats.warm.running.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "nearcache_upstream_identity_changes",
            "Times a connection reached another upstream server than the one before (restart, failover, restore): L1 was flushed on every instance.",
            ctx.upstream.identity_changes(),
        )?;
        let backlog = ctx.upstream.backlog.stats();
        gauge(
            &mut enc,
            "nearcache_upstream_in_flight_commands",
            "Commands sent or queued to Redis and not yet answered (capped by upstream.max_in_flight).",
            None,
            n(backlog.commands),
        )?;
        gauge(
            &mut enc,
            "nearcache_upstream_in_flight",
            "Request bytes sent or queued to Redis and not yet answered (capped by upstream.max_in_flight_bytes).",
            Some(&Unit::Bytes),
            n(backlog.bytes),
        )?;
        counter(
            &mut enc,
            "nearcache_upstream_backlog_waits",
            "Requests that found the upstream backlog full and waited for room.",
            backlog.waited,
        )?;
        counter(
            &mut enc,
            "nearcache_upstream_backlog_refused",
            "Requests refused unsent after waiting command_timeout for room in the upstream backlog.",
            backlog.refused,
        )?;

        // Rate limits, by limit (names come from the config: bounded).
        let snapshot = ctx.snapshot.load();
        {
            let mut m = enc.encode_descriptor(
                "nearcache_limit_decisions",
                "Rate-limit decisions, by limit and decision (allowed, delayed, rejected).",
                None,
                MetricType::Counter,
            )?;
            for limit in snapshot.limits.iter() {
                let s = &limit.stats;
                for (decision, v) in [
                    ("allowed", s.allowed.load(Relaxed)),
                    ("delayed", s.delayed.load(Relaxed)),
                    ("rejected", s.rejected.load(Relaxed)),
                ] {
                    let labels = [("limit", limit.name()), ("decision", decision)];
                    ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                }
            }
        }

        // L1, per rule.
        let rules: Vec<_> = snapshot
            .rules
            .iter()
            .map(|r| {
                let (kind, sel) = r.selector();
                (
                    format!("{kind}:{}", String::from_utf8_lossy(sel)),
                    r.stats.clone(),
                )
            })
            .collect();
        let per_rule = |f: fn(&crate::stats::RuleStats) -> u64| {
            rules
                .iter()
                .map(move |(name, s)| (name.clone(), f(s)))
                .collect::<Vec<_>>()
        };
        for (name, help, f) in [
            (
                "nearcache_l1_hits",
                "Reads answered from L1, by rule.",
                (|s: &crate::stats::RuleStats| s.hits.load(Relaxed)) as fn(&_) -> u64,
            ),
            (
                "nearcache_l1_misses",
                "Cacheable reads that went upstream, by rule.",
                |s| s.misses.load(Relaxed),
            ),
            (
                "nearcache_l1_fills",
                "Replies stored in L1, by rule.",
                |s| s.fills.load(Relaxed),
            ),
            (
                "nearcache_l1_stale_hits",
                "Reads answered from L1 past their TTL while Redis was unreachable (stale_if_error), by rule.",
                |s| s.stale_hits.load(Relaxed),
            ),
            (
                "nearcache_l1_stale_fills_rejected",
                "Fills discarded because the key was invalidated while they were in flight, by rule.",
                |s| s.stale_fills_rejected.load(Relaxed),
            ),
            (
                "nearcache_l1_evictions",
                "Entries evicted for space, by rule.",
                |s| s.evictions.load(Relaxed),
            ),
            (
                "nearcache_l1_invalidations",
                "Keys dropped from L1 because they were written, by rule.",
                |s| s.invalidations.load(Relaxed),
            ),
        ] {
            counters(&mut enc, name, help, "rule", per_rule(f))?;
        }
        {
            let mut m = enc.encode_descriptor(
                "nearcache_l1_rule",
                "Bytes held in L1, by rule.",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            )?;
            for (name, s) in &rules {
                let labels = [("rule", name.clone())];
                ConstGauge::new(s.bytes.load(Relaxed)).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "nearcache_l1_rule_entries",
                "Keys held in L1, by rule.",
                None,
                MetricType::Gauge,
            )?;
            for (name, s) in &rules {
                let labels = [("rule", name.clone())];
                ConstGauge::new(s.entries.load(Relaxed)).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "nearcache_l1_compression_saved",
                "Bytes compression saves on the entries L1 holds (compress_min_size), by rule: their uncompressed size is nearcache_l1_rule_bytes plus this.",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            )?;
            for (name, s) in &rules {
                let labels = [("rule", name.clone())];
                ConstGauge::new(s.compression_saved.load(Relaxed))
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        if let Some(l1) = &ctx.l1 {
            let (entries, bytes) = l1.usage();
            gauge(
                &mut enc,
                "nearcache_l1_entries",
                "Entries in L1.",
                None,
                n(entries),
            )?;
            gauge(
                &mut enc,
                "nearcache_l1",
                "Bytes held in L1 (entry weights).",
                Some(&Unit::Bytes),
                n(bytes),
            )?;
        }
        gauge(
            &mut enc,
            "nearcache_l1_max_memory",
            "L1's budget (cache.max_memory).",
            Some(&Unit::Bytes),
            n(ctx.cfg.cache.max_memory.0),
        )?;

        // Coherence bus.
        if let Some(bus) = &ctx.bus {
            let s = &ctx.stats.bus;
            gauge(
                &mut enc,
                "nearcache_bus_up",
                "1 while connected to NATS.",
                None,
                i64::from(bus.healthy()),
            )?;
            gauge(
                &mut enc,
                "nearcache_bus_l1_usable",
                "1 while L1 may be served under the bus-loss policy.",
                None,
                i64::from(bus.l1_usable()),
            )?;
            for (name, help, v) in [
                (
                    "nearcache_invalidations_published",
                    "Invalidation messages published.",
                    &s.published,
                ),
                (
                    "nearcache_invalidation_keys_published",
                    "Keys published in invalidations.",
                    &s.published_keys,
                ),
                (
                    "nearcache_invalidations_received",
                    "Invalidation messages received from peers.",
                    &s.received,
                ),
                (
                    "nearcache_invalidation_keys_applied",
                    "Keys dropped because peers wrote them.",
                    &s.applied_keys,
                ),
                (
                    "nearcache_invalidation_gaps",
                    "Sequence gaps seen in peers' messages.",
                    &s.gaps,
                ),
                (
                    "nearcache_bus_flushes",
                    "L1 flushes caused by the bus.",
                    &s.flushes,
                ),
                (
                    "nearcache_bus_publish_errors",
                    "Publish failures.",
                    &s.publish_errors,
                ),
                (
                    "nearcache_bus_dropped_keys",
                    "Keys not published (bus down or queue full).",
                    &s.dropped_keys,
                ),
                (
                    "nearcache_bus_silent_peers",
                    "Peers that fell silent past peer_timeout.",
                    &s.silent_peers,
                ),
            ] {
                counter(&mut enc, name, help, v.load(Relaxed))?;
            }
            gauge(
                &mut enc,
                "nearcache_bus_queued_keys",
                "Keys waiting for the publisher now.",
                None,
                n(s.queued_keys.load(Relaxed) as u64),
            )?;
            let (sum, count, buckets) = rebucket(&s.delay_us);
            enc.encode_descriptor(
                "nearcache_bus_delay",
                "Delay of peers' invalidations, from the write's acknowledgement to its application here.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
        }
        if ctx.cfg.coherence.redis_tracking {
            let t = &ctx.stats.tracking;
            gauge(
                &mut enc,
                "nearcache_tracking_up",
                "1 while Redis CLIENT TRACKING is active.",
                None,
                i64::from(t.active.load(Relaxed)),
            )?;
            counter(
                &mut enc,
                "nearcache_tracking_keys",
                "Keys Redis's invalidations named.",
                t.keys.load(Relaxed),
            )?;
        }

        // Process.
        if let Some(rss) = process_rss_bytes() {
            gauge(
                &mut enc,
                "nearcache_process_resident_memory",
                "Resident set size.",
                Some(&Unit::Bytes),
                n(rss),
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut enc,
                "nearcache_process_open_fds",
                "Open file descriptors.",
                None,
                n(fds.count() as u64),
            )?;
        }
        // A task per connection (and per pending fill, relay, timer) that never
        // ends shows here long before it shows in RSS: the soak test watches it.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            gauge(
                &mut enc,
                "nearcache_runtime_alive_tasks",
                "Tokio tasks alive in the runtime.",
                None,
                n(rt.metrics().num_alive_tasks() as u64),
            )?;
        }
        Ok(())
    }
}

/// VmRSS from /proc/self/status (None off Linux).
fn process_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
