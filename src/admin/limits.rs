//! `PROXY LIMITS`, and the `limits` entry of `PROXY STATS`.

use std::sync::atomic::Ordering::Relaxed;

use crate::context::Context;
use crate::protocol::reply::Reply;

fn n(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `PROXY LIMITS`: every limit in force, as configured, with its current
/// share and counters.
pub fn limits(r: &mut Reply, ctx: &Context) {
    let snapshot = ctx.snapshot.load();
    r.array(snapshot.limits.len());
    for limit in snapshot.limits.iter() {
        let cfg = limit.config();
        let words = |list: &[String]| list.join(" ");
        let per: Vec<&str> = cfg.per.iter().map(|p| p.name()).collect();
        r.map(16);
        r.bulk(b"name").bulk(cfg.name.as_bytes());
        r.bulk(b"limit").bulk(limit.label().as_bytes());
        r.bulk(b"rate").bulk(cfg.rate.to_string().as_bytes());
        r.bulk(b"burst").int(n(cfg.burst.unwrap_or(cfg.rate.count)));
        r.bulk(b"per").bulk(per.join(" ").as_bytes());
        r.bulk(b"commands").bulk(words(&cfg.commands).as_bytes());
        r.bulk(b"keys").bulk(words(&cfg.keys).as_bytes());
        r.bulk(b"counts").bulk(cfg.counts.name().as_bytes());
        r.bulk(b"scope").bulk(cfg.scope.name().as_bytes());
        r.bulk(b"action").bulk(cfg.action.name().as_bytes());
        r.bulk(b"max_wait_ms")
            .int(i64::try_from(cfg.max_wait.0.as_millis()).unwrap_or(i64::MAX));
        r.bulk(b"instances").int(i64::from(limit.instances()));
        // (Rounded: what this instance lets through per second now.)
        r.bulk(b"share_per_second")
            .int(limit.share_per_second().round() as i64);
        r.bulk(b"buckets").int(n(limit.buckets() as u64));
        counters(r, limit);
    }
}

fn counters(r: &mut Reply, limit: &crate::limits::Limit) {
    let s = &limit.stats;
    r.bulk(b"allowed").int(n(s.allowed.load(Relaxed)));
    r.bulk(b"delayed").int(n(s.delayed.load(Relaxed)));
    r.bulk(b"rejected").int(n(s.rejected.load(Relaxed)));
}

/// The `limits` entry of `PROXY STATS`: each limit's counters, by name.
pub fn stats(r: &mut Reply, ctx: &Context) {
    let snapshot = ctx.snapshot.load();
    r.bulk(b"limits").map(snapshot.limits.len());
    for limit in snapshot.limits.iter() {
        r.bulk(limit.name().as_bytes()).map(3);
        counters(r, limit);
    }
}
