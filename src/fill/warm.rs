//! Warming L1 from Redis: at start, and after every full flush (another
//! upstream server, a bus gap or reconnect, `FLUSHALL`), the keys of the
//! rules with `warm = true` are found with `SCAN … MATCH … TYPE …` and
//! fetched at a bounded rate, so an instance does not meet a burst of
//! traffic cold.
//!
//! - **What is fetched.** Strings with `GET`, hashes with `HGETALL` (the
//!   reads such keys are cached for); other types are left to their first
//!   miss. Replies are filled for RESP2 clients, and for RESP3 ones with
//!   `cache.warm.resp3`. The command name's case does not matter to L1
//!   (`GET` from redis-py and `get` from ioredis are one request), so warmed
//!   entries serve every client library.
//! - **Never stale.** Each key's fill token is taken before its fetch and the
//!   fill goes through [`L1::fill`], so a write or a flush while a batch is
//!   on its way discards what it brought, as for any miss; with the key's
//!   `PTTL` in the same pipeline, an entry never outlives the key in Redis.
//! - **Bounded.** `cache.warm.rate` keys per second, `max_keys` per pass, and
//!   a pass stops when L1 is 80 % full: warming never evicts what clients
//!   read.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::{FillPolicy, bus_allows, integer};
use crate::cache::{L1, Rule, Viewer};
use crate::context::Context;
use crate::protocol::parser::parse_i64;
use crate::protocol::{Protocol, ReplyScanner};
use crate::upstream::{Op, UpstreamError, encode_command};

/// Why a pass stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    /// Redis could not be reached or dropped the connection.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Redis answered something other than what was asked for.
    #[error("unexpected reply to {0}")]
    Reply(&'static str),
    /// The bus went down (its loss policy bypasses L1): the flush on its
    /// return warms again.
    #[error("the coherence bus is down")]
    BusDown,
}

/// How a pass ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Pass {
    /// Keys filled.
    filled: u64,
    /// Keys SCAN returned.
    scanned: u64,
}

/// Runs for the life of the server: a pass at start, then one after every
/// full flush. Ends when the server is gone.
pub async fn run(ctx: Weak<Context>) {
    let mut first = true;
    loop {
        if !first && !flushed(&ctx).await {
            return;
        }
        first = false;
        let Some(ctx) = ctx.upgrade() else { return };
        let Some(l1) = ctx.l1.clone() else { return };
        if !ctx.snapshot.load().rules.iter().any(|r| r.warm) {
            continue;
        }
        warm_until_done(&ctx, &l1).await;
    }
}

/// Waits for the next flush; false once the server is gone.
async fn flushed(ctx: &Weak<Context>) -> bool {
    loop {
        let Some(l1) = ctx.upgrade().and_then(|c| c.l1.clone()) else {
            return false;
        };
        // Not holding the server while it may be shutting down.
        if tokio::time::timeout(Duration::from_secs(1), l1.flushed().notified())
            .await
            .is_ok()
        {
            return true;
        }
    }
}

/// One pass, tried again every second while Redis is unreachable.
async fn warm_until_done(ctx: &Context, l1: &Arc<L1>) {
    let stats = &ctx.stats.warm;
    stats.running.store(true, Relaxed);
    stats.last_keys.store(0, Relaxed);
    let start = Instant::now();
    let mut warned = false;
    loop {
        match pass(ctx, l1, start).await {
            Ok(p) => {
                let ms = start.elapsed().as_millis() as u64;
                stats.passes.fetch_add(1, Relaxed);
                stats.last_ms.store(ms, Relaxed);
                tracing::info!(
                    keys = p.filled,
                    scanned = p.scanned,
                    elapsed = ?start.elapsed(),
                    rate = %format_args!("{:.0}/s", p.filled as f64 / start.elapsed().as_secs_f64().max(1e-3)),
                    "L1 warmed"
                );
                break;
            }
            Err(WarmError::BusDown) => {
                stats.failed.fetch_add(1, Relaxed);
                tracing::info!("warming L1 stopped: the bus is down (its return warms again)");
                break;
            }
            Err(e) => {
                if !warned {
                    stats.failed.fetch_add(1, Relaxed);
                    tracing::warn!(error = %e, "warming L1 failed; trying again every second");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    stats.running.store(false, Relaxed);
}

/// Walks every warmed rule once.
async fn pass(ctx: &Context, l1: &Arc<L1>, start: Instant) -> Result<Pass, WarmError> {
    let snapshot = ctx.snapshot.load_full();
    let cfg = &ctx.cfg.cache.warm;
    let db = ctx.upstream.default_db();
    let budget = ctx.cfg.cache.max_memory.0 / 5 * 4;
    let rules: Vec<&Rule> = snapshot.rules.iter().filter(|r| r.warm).collect();
    tracing::info!(
        rules = rules.len(),
        rate = cfg.rate,
        max_keys = cfg.max_keys,
        "warming L1"
    );
    let mut done = Pass::default();
    let mut progress = Instant::now();
    // The keys the fleet reads first: one peer's hot keys, by type.
    let mut from_peer = std::collections::HashSet::new();
    if let Some(bus) = &ctx.bus {
        wait_for_bus(bus, start + cfg.timeout.0).await?;
        let hot: Vec<Bytes> = bus
            .peer_hot_keys()
            .await
            .into_iter()
            .filter(|(d, k)| *d == db && snapshot.rules.caching(k).is_some_and(|r| r.warm))
            .map(|(_, k)| k)
            .take(usize::try_from(cfg.max_keys).unwrap_or(usize::MAX))
            .collect();
        for batch in hot.chunks(cfg.scan_count as usize) {
            for (read, keys) in by_type(ctx, batch).await? {
                for (policy, keys) in by_rule(&snapshot.rules, &keys) {
                    done.filled += fetch(ctx, l1, &policy, db, read, &keys).await?;
                    ctx.stats
                        .warm
                        .peer_keys
                        .fetch_add(keys.len() as u64, Relaxed);
                    ctx.stats.warm.keys.fetch_add(keys.len() as u64, Relaxed);
                }
            }
            from_peer.extend(batch.iter().cloned());
            ctx.stats.warm.last_keys.store(done.filled, Relaxed);
            let due = start + Duration::from_secs_f64(done.filled as f64 / f64::from(cfg.rate));
            tokio::time::sleep_until(due.into()).await;
            if done.filled >= cfg.max_keys || l1.usage().1 >= budget {
                return Ok(done);
            }
        }
    }
    for rule in rules {
        let pattern = match &rule.pattern {
            Some(p) => p.to_vec(),
            None => [crate::glob::escape(&rule.prefix), b"*".to_vec()].concat(),
        };
        let policy = FillPolicy::of(rule);
        for (kind, read) in [(&b"string"[..], &b"GET"[..]), (b"hash", b"HGETALL")] {
            let mut cursor = Bytes::from_static(b"0");
            loop {
                let conn = ctx.default_pool.shared().await?;
                let scan = encode_command(&[
                    &b"SCAN"[..],
                    &cursor,
                    b"MATCH",
                    &pattern,
                    b"COUNT",
                    cfg.scan_count.to_string().as_bytes(),
                    b"TYPE",
                    kind,
                ]);
                let reply = conn.ask(scan).await.map_err(|f| f.error)?;
                let (next, keys) = scan_reply(&reply).ok_or(WarmError::Reply("SCAN"))?;
                done.scanned += keys.len() as u64;
                // Keys a longer prefix or a pattern governs are that rule's.
                let keys: Vec<Bytes> = keys
                    .into_iter()
                    .filter(|k| {
                        snapshot
                            .rules
                            .caching(k)
                            .is_some_and(|r| std::ptr::eq(r, rule))
                            && !from_peer.contains(k)
                    })
                    .take(usize::try_from(cfg.max_keys - done.filled).unwrap_or(usize::MAX))
                    .collect();
                if !bus_allows(ctx.bus.as_ref()) {
                    return Err(WarmError::BusDown);
                }
                done.filled += fetch(ctx, l1, &policy, db, read, &keys).await?;
                ctx.stats.warm.keys.fetch_add(keys.len() as u64, Relaxed);
                ctx.stats.warm.last_keys.store(done.filled, Relaxed);
                if progress.elapsed() >= Duration::from_secs(5) {
                    progress = Instant::now();
                    tracing::info!(keys = done.filled, scanned = done.scanned, elapsed = ?start.elapsed(), "warming L1");
                }
                // The rate: this many keys may not have been fetched sooner.
                let due = start + Duration::from_secs_f64(done.filled as f64 / f64::from(cfg.rate));
                tokio::time::sleep_until(due.into()).await;
                if done.filled >= cfg.max_keys || l1.usage().1 >= budget {
                    return Ok(done);
                }
                if &next[..] == b"0" {
                    break;
                }
                cursor = next;
            }
        }
    }
    Ok(done)
}

/// Waits until L1 may be served as far as the bus is concerned (it is
/// connected, or its loss policy serves), until `deadline`.
async fn wait_for_bus(
    bus: &Arc<crate::coherence::Bus>,
    deadline: Instant,
) -> Result<(), WarmError> {
    while !bus.l1_usable() {
        if Instant::now() >= deadline {
            return Err(WarmError::BusDown);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The keys warmed with each read: strings with `GET`, hashes with
/// `HGETALL`, by the `TYPE` of each (one pipeline); other types left out.
type ByType = Vec<(&'static [u8], Vec<Bytes>)>;

/// `keys` split by how they are warmed (see [`ByType`]).
async fn by_type(ctx: &Context, keys: &[Bytes]) -> Result<ByType, WarmError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut frames = BytesMut::new();
    for key in keys {
        frames.extend_from_slice(&encode_command(&[&b"TYPE"[..], key]));
    }
    let replies = pipeline(ctx, frames.freeze(), keys.len()).await?;
    let (mut strings, mut hashes) = (Vec::new(), Vec::new());
    let mut at = 0;
    for key in keys {
        let len = ReplyScanner::new()
            .scan(&replies[at..])
            .ok()
            .flatten()
            .ok_or(WarmError::Reply("TYPE"))?;
        match &replies[at..at + len] {
            b"+string\r\n" => strings.push(key.clone()),
            b"+hash\r\n" => hashes.push(key.clone()),
            _ => {}
        }
        at += len;
    }
    Ok(vec![(&b"GET"[..], strings), (&b"HGETALL"[..], hashes)])
}

/// Sends `frames` (`replies` commands) on a shared connection and returns
/// the replies, all of them or an error.
async fn pipeline(ctx: &Context, frames: Bytes, replies: usize) -> Result<Bytes, WarmError> {
    let count = u32::try_from(replies).unwrap_or(u32::MAX);
    let (op, rx) = Op::request(frames, count, false);
    let conn = ctx.default_pool.shared().await?;
    conn.send(op).map_err(|_| UpstreamError::ConnectionLost)?;
    Ok(rx
        .await
        .map_err(|_| UpstreamError::ConnectionLost)?
        .map_err(|f| f.error)?)
}

/// `keys` grouped by the rule that caches each, with its fill policy.
fn by_rule(rules: &crate::cache::Rules, keys: &[Bytes]) -> Vec<(FillPolicy, Vec<Bytes>)> {
    let mut groups: Vec<(&Rule, Vec<Bytes>)> = Vec::new();
    for key in keys {
        let Some(rule) = rules.caching(key) else {
            continue;
        };
        match groups.iter_mut().find(|(r, _)| std::ptr::eq(*r, rule)) {
            Some((_, keys)) => keys.push(key.clone()),
            None => groups.push((rule, vec![key.clone()])),
        }
    }
    groups
        .into_iter()
        .map(|(r, k)| (FillPolicy::of(r), k))
        .collect()
}

/// Fetches `read key` and `PTTL key` for every key in one pipeline and fills
/// L1 with what came back; returns how many were filled.
async fn fetch(
    ctx: &Context,
    l1: &Arc<L1>,
    policy: &FillPolicy,
    db: u32,
    read: &'static [u8],
    keys: &[Bytes],
) -> Result<u64, WarmError> {
    if keys.is_empty() {
        return Ok(0);
    }
    let tokens: Vec<_> = keys.iter().map(|k| l1.begin_fill(db, k)).collect();
    let mut frames = BytesMut::new();
    for key in keys {
        frames.extend_from_slice(&encode_command(&[read, key]));
        frames.extend_from_slice(&encode_command(&[&b"PTTL"[..], key]));
    }
    let mut replies = pipeline(ctx, frames.freeze(), keys.len() * 2).await?;
    if policy.decode && read == b"GET" {
        if let Ok(decoded) = crate::stored::decode_values(Ok(replies.clone())) {
            replies = decoded;
        }
    }
    let resp3 = ctx.cfg.cache.warm.resp3;
    let mut filled = 0;
    let mut at = 0;
    let mut next = || -> Result<&[u8], WarmError> {
        let len = ReplyScanner::new()
            .scan(&replies[at..])
            .ok()
            .flatten()
            .ok_or(WarmError::Reply("a warming read"))?;
        at += len;
        Ok(&replies[at - len..at])
    };
    for (key, token) in keys.iter().zip(tokens) {
        let value = next()?;
        let pttl = integer(Some(next()?));
        let request = encode_command(&[read, key]);
        let resp2: Viewer = Protocol::Resp2.into();
        if policy.fill(l1, token, (db, key), resp2, &request, value, pttl) {
            filled += 1;
        }
        if resp3 {
            if let Some(value) = as_resp3(value) {
                let viewer = Protocol::Resp3.into();
                policy.fill(l1, token, (db, key), viewer, &request, &value, pttl);
            }
        }
    }
    Ok(filled)
}

/// A RESP2 reply to `GET` or `HGETALL` as RESP3 has it: a bulk string is the
/// same; a flat array of field/value pairs is a map.
fn as_resp3(value: &[u8]) -> Option<Bytes> {
    match value.first()? {
        b'$' => Some(Bytes::copy_from_slice(value)),
        b'*' => {
            let nl = value.iter().position(|&b| b == b'\r')?;
            let n = parse_i64(&value[1..nl])?;
            if n < 0 || n % 2 != 0 {
                return None;
            }
            let mut out = BytesMut::with_capacity(value.len());
            out.extend_from_slice(format!("%{}", n / 2).as_bytes());
            out.extend_from_slice(&value[nl..]);
            Some(out.freeze())
        }
        _ => None,
    }
}

/// `SCAN`'s reply: the next cursor and the keys.
fn scan_reply(reply: &[u8]) -> Option<(Bytes, Vec<Bytes>)> {
    let (cursor, rest) = bulk(reply.strip_prefix(b"*2\r\n")?)?;
    let keys = bulk_array(rest)?;
    Some((cursor, keys))
}

/// A bulk string at the start of `frame`, and what follows it.
fn bulk(frame: &[u8]) -> Option<(Bytes, &[u8])> {
    let rest = frame.strip_prefix(b"$")?;
    let nl = rest.iter().position(|&b| b == b'\r')?;
    let len = usize::try_from(parse_i64(&rest[..nl])?).ok()?;
    let start = nl + 2;
    let body = rest.get(start..start + len)?;
    let after = rest.get(start + len + 2..)?;
    Some((Bytes::copy_from_slice(body), after))
}

/// `*N` then N bulk strings.
fn bulk_array(frame: &[u8]) -> Option<Vec<Bytes>> {
    let rest = frame.strip_prefix(b"*")?;
    let nl = rest.iter().position(|&b| b == b'\r')?;
    let n = usize::try_from(parse_i64(&rest[..nl])?).ok()?;
    let mut rest = &rest[nl + 2..];
    let mut keys = Vec::with_capacity(n);
    for _ in 0..n {
        let (key, after) = bulk(rest)?;
        keys.push(key);
        rest = after;
    }
    Some(keys)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn scan_replies_are_read_whole_or_not_at_all() {
        let reply = b"*2\r\n$2\r\n17\r\n*2\r\n$3\r\nt:a\r\n$4\r\nt:bb\r\n";
        let (cursor, keys) = scan_reply(reply).unwrap();
        assert_eq!(&cursor[..], b"17");
        assert_eq!(keys, vec![Bytes::from("t:a"), Bytes::from("t:bb")]);
        assert_eq!(scan_reply(b"*2\r\n$1\r\n0\r\n*0\r\n").unwrap().1.len(), 0);
        assert!(scan_reply(b"*2\r\n$1\r\n0\r\n*2\r\n$3\r\nt:a\r\n").is_none());
        assert!(scan_reply(b"-ERR no\r\n").is_none());
    }

    #[test]
    fn resp2_replies_become_resp3_ones() {
        assert_eq!(&as_resp3(b"$1\r\nv\r\n").unwrap()[..], b"$1\r\nv\r\n");
        assert_eq!(
            &as_resp3(b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n").unwrap()[..],
            b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n"
        );
        assert_eq!(&as_resp3(b"*0\r\n").unwrap()[..], b"%0\r\n");
        assert!(as_resp3(b"*3\r\n").is_none());
        assert!(as_resp3(b"-ERR\r\n").is_none());
    }
}
