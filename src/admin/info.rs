//! `INFO`'s `# Nearcache` section, and `PROXY INFO`.
//!
//! Sections follow Redis's rules: `INFO` with no argument, `default`, `all`
//! or `everything` includes ours after Redis's; `INFO nearcache` (alone,
//! any case) is answered by nearcache without asking Redis; any other list
//! of sections that names `nearcache` gets Redis's answer for the others
//! with ours appended (Redis ignores a section it does not know). Every
//! field is prefixed `nearcache_`, so a client that reads `INFO` into one
//! flat map (as most do) never has one of Redis's fields overwritten.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;

use super::config_get::mask_url;
use crate::context::Context;
use crate::protocol::parser::parse_i64;
use crate::protocol::reply::{Protocol, Reply};

/// Which sections an `INFO` asks for, as far as nearcache is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sections {
    /// Only `nearcache`: answered here.
    Ours,
    /// Redis's and ours.
    Both,
    /// Redis's only.
    Redis,
}

/// The sections `args` (INFO's arguments) ask for.
pub fn sections(args: &[Bytes]) -> Sections {
    let ours = |a: &Bytes| a.eq_ignore_ascii_case(b"nearcache");
    if args.is_empty() {
        return Sections::Both;
    }
    if args.iter().all(ours) {
        return Sections::Ours;
    }
    let includes_ours = |a: &Bytes| {
        ours(a)
            || a.eq_ignore_ascii_case(b"all")
            || a.eq_ignore_ascii_case(b"everything")
            || a.eq_ignore_ascii_case(b"default")
    };
    if args.iter().any(includes_ours) {
        Sections::Both
    } else {
        Sections::Redis
    }
}

/// The `# Nearcache` section, `name:value` lines ending in CRLF as Redis
/// writes its own.
pub fn section(ctx: &Context) -> String {
    let mut s = String::from("# Nearcache\r\n");
    let mut line = |name: &str, value: &dyn std::fmt::Display| {
        let _ = write!(s, "nearcache_{name}:{value}\r\n");
    };
    let req = &ctx.stats.requests;
    line("version", &env!("CARGO_PKG_VERSION"));
    line(
        "uptime_in_seconds",
        &ctx.stats.started.0.elapsed().as_secs(),
    );
    line("connected_clients", &req.clients.load(Relaxed));
    line("pinned_clients", &ctx.directory.pinned_count());
    let (hits, misses) = hits_and_misses(ctx);
    match &ctx.l1 {
        Some(l1) => {
            let (keys, bytes) = l1.usage();
            line("l1_enabled", &1);
            line("l1_keys", &keys);
            line("l1_bytes", &bytes);
        }
        None => {
            line("l1_enabled", &0);
            line("l1_keys", &0);
            line("l1_bytes", &0);
        }
    }
    line("l1_max_memory", &ctx.cfg.cache.max_memory.0);
    line("l1_hits", &hits);
    line("l1_misses", &misses);
    let ratio = match hits + misses {
        0 => 0.0,
        total => hits as f64 / total as f64,
    };
    line("l1_hit_ratio", &format_args!("{ratio:.4}"));
    let snapshot = ctx.snapshot.load();
    let stale: u64 = snapshot
        .rules
        .iter()
        .map(|r| r.stats.stale_hits.load(Relaxed))
        .sum();
    line("l1_stale_hits", &stale);
    let saved: i64 = snapshot
        .rules
        .iter()
        .map(|r| r.stats.compression_saved.load(Relaxed))
        .sum();
    line("l1_compression_saved_bytes", &saved.max(0));
    line("upstream_up", &u8::from(ctx.default_pool.any_shared_up()));
    line("bus", &super::readiness(ctx, false).bus);
    let peers = match &ctx.bus {
        Some(_) => ctx.stats.bus.live_peers.load(Relaxed),
        None => 0,
    };
    line("bus_live_peers", &peers);
    line("rate_limit_rejected", &ctx.stats.limits_rejected());
    s
}

/// L1 hits and misses over every rule in force.
pub fn hits_and_misses(ctx: &Context) -> (u64, u64) {
    let snapshot = ctx.snapshot.load();
    snapshot.rules.iter().fold((0, 0), |(h, m), rule| {
        (
            h + rule.stats.hits.load(Relaxed),
            m + rule.stats.misses.load(Relaxed),
        )
    })
}

/// `INFO nearcache`: our section alone, as Redis answers for one section
/// (a bulk string in RESP2, a verbatim `txt` string in RESP3).
pub fn ours(ctx: &Context, proto: Protocol) -> Bytes {
    let mut r = Reply::new(proto);
    r.text(section(ctx).as_bytes());
    r.finish()
}

/// Redis's `INFO` reply with our section appended after a blank line, in
/// `proto`; anything but a string reply (an error, `+QUEUED`) unchanged.
pub fn appended(ctx: &Context, redis: &Bytes, proto: Protocol) -> Bytes {
    let Some(text) = string_body(redis) else {
        return redis.clone();
    };
    let ours = section(ctx);
    let mut body = Vec::with_capacity(text.len() + 2 + ours.len());
    body.extend_from_slice(text);
    if !text.is_empty() {
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(ours.as_bytes());
    let mut r = Reply::new(proto);
    r.text(&body);
    r.finish()
}

/// The text of one bulk (`$`) or verbatim (`=`, format stripped) string
/// reply, if `reply` is exactly that.
fn string_body(reply: &[u8]) -> Option<&[u8]> {
    let tag = *reply.first()?;
    if tag != b'$' && tag != b'=' {
        return None;
    }
    let header_end = reply.windows(2).position(|w| w == b"\r\n")?;
    let len = usize::try_from(parse_i64(&reply[1..header_end])?).ok()?;
    let start = header_end + 2;
    let body = reply.get(start..start + len)?;
    if reply.len() != start + len + 2 {
        return None;
    }
    match tag {
        b'=' => body.get(4..),
        _ => Some(body),
    }
}

/// `PROXY INFO`: what this instance is and where it points, secrets masked.
pub fn proxy_info(r: &mut Reply, ctx: &Context) {
    let cfg = &ctx.cfg;
    let config_file = ctx
        .source
        .as_ref()
        .map(|s| s.path.display().to_string())
        .unwrap_or_default();
    let (bus, instance, healthy) = match &ctx.bus {
        Some(bus) => (
            mask_url(&cfg.coherence.nats_url),
            bus.instance.clone(),
            i64::from(bus.healthy()),
        ),
        None => ("none".to_owned(), String::new(), 0),
    };
    let fields: [(&str, String); 10] = [
        ("version", env!("CARGO_PKG_VERSION").to_owned()),
        (
            "uptime_in_seconds",
            ctx.stats.started.0.elapsed().as_secs().to_string(),
        ),
        ("config_file", config_file),
        ("listen", cfg.server.listen.clone()),
        ("admin_listen", cfg.admin.listen.clone()),
        ("upstream", mask_url(&cfg.upstream.url)),
        (
            "upstream_up",
            u8::from(ctx.default_pool.any_shared_up()).to_string(),
        ),
        (
            "upstream_run_id",
            ctx.upstream
                .identity()
                .map(|i| i.run_id)
                .unwrap_or_default(),
        ),
        ("bus", bus),
        ("bus_instance", instance),
    ];
    r.map(fields.len() + 1);
    for (name, value) in fields {
        r.bulk(name.as_bytes()).bulk(value.as_bytes());
    }
    r.bulk(b"bus_healthy").int(healthy);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<Bytes> {
        a.iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    #[test]
    fn sections_follow_redis_s_rules() {
        assert_eq!(sections(&args(&[])), Sections::Both);
        assert_eq!(sections(&args(&["NearCache"])), Sections::Ours);
        assert_eq!(sections(&args(&["nearcache", "nearcache"])), Sections::Ours);
        assert_eq!(sections(&args(&["server", "nearcache"])), Sections::Both);
        for s in ["all", "EVERYTHING", "default"] {
            assert_eq!(sections(&args(&[s])), Sections::Both, "{s}");
        }
        assert_eq!(sections(&args(&["server"])), Sections::Redis);
        assert_eq!(sections(&args(&["server", "clients"])), Sections::Redis);
    }

    #[test]
    fn string_bodies_are_read_in_either_protocol() {
        assert_eq!(string_body(b"$5\r\na:1\r\n\r\n"), Some(&b"a:1\r\n"[..]));
        assert_eq!(string_body(b"=9\r\ntxt:a:1\r\n\r\n"), Some(&b"a:1\r\n"[..]));
        assert_eq!(string_body(b"$0\r\n\r\n"), Some(&b""[..]));
        assert_eq!(string_body(b"+QUEUED\r\n"), None);
        assert_eq!(string_body(b"-ERR x\r\n"), None);
        assert_eq!(string_body(b"$5\r\na:1\r\n\r\n:1\r\n"), None);
    }
}
