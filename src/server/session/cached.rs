//! The cache phases of the request path: whether a read is served from L1
//! (the fetching is [`crate::fill`]'s), and the keys a write touches.
//!
//! Invariants enforced here (DESIGN.md, "Coherence invariants"):
//! - **Read your writes.** A write's keys are dropped from L1 when it is
//!   dispatched (so the writer's own pipelined reads miss) and again when
//!   Redis acknowledges it, before the client sees the reply (so a read that
//!   raced the write cannot leave the old value behind).
//! - Pinned clients (MULTI, WATCH, pub/sub, tracking) never read from L1:
//!   they see Redis's semantics exactly.
//! - While the bus is down, L1 follows the loss policy.

use std::sync::Arc;

use bytes::Bytes;

use super::mode::Mode;
use super::{Request, Session};
use crate::cache::{self, Invalidation, Now, Rules};
use crate::command::keys::key_positions;
use crate::command::{CommandSpec, flag};
use crate::error::ProxyError;
use crate::fill::{self, Fetch, FillPolicy, Sent};
use crate::limits::Stage;
use crate::server::outbox::{Outbox, Slot};
use crate::stats::{Path, RuleStats};
use crate::upstream::{Lane, Op, encode_command};

/// The largest MGET buffer a session keeps between requests.
const MGET_BUF_KEEP: usize = 64 * 1024;

/// A fetch's way upstream: the session's own shared connection, ordered
/// after its earlier commands.
struct Shared<'a> {
    lane: &'a mut Lane,
    out: &'a mut Outbox,
}

impl fill::Upstream for Shared<'_> {
    async fn request(&mut self, frames: Bytes, replies: u32) -> Sent {
        let (op, rx) = Op::request(frames, replies, false);
        Sent(self.lane.send_shared(op, self.out).await.map(|()| rx))
    }
}

/// A fetch for this session: its cache, flights, connection and state.
macro_rules! fetch {
    ($s:expr, $l1:expr) => {
        Fetch {
            l1: $l1,
            flights: &$s.ctx.flights,
            upstream: Shared {
                lane: &mut $s.lane,
                out: &mut $s.out,
            },
            db: $s.client.db,
            viewer: $s.client.viewer(),
            scratch: &mut $s.scratch.ids,
            bus: $s.ctx.bus.as_ref(),
        }
    };
}

impl Session {
    /// Serves a cacheable read from L1, or fetches it. Returns false when the
    /// command is not one L1 handles (the caller forwards it as usual).
    pub(super) async fn cached_read(&mut self, req: &Request<'_>) -> bool {
        // Cheap checks first: most forwarded commands are not cacheable
        // reads, and they should not pay for more.
        let Some(spec) = req.spec else { return false };
        if self.ctx.l1.is_none() || !matches!(self.mode, Mode::Shared) || req.argv.len() < 2 {
            return false;
        }
        let mget = spec.name == "mget";
        if !mget && (!spec.has(flag::CACHEABLE) || (spec.name == "exists" && req.argv.len() != 2)) {
            return false;
        }
        // Bus down: L1 follows the loss policy (by default, not served).
        if self.ctx.bus.as_ref().is_some_and(|bus| !bus.l1_usable()) {
            return false;
        }
        if mget {
            let Some(l1) = self.ctx.l1.clone() else {
                return false;
            };
            return self.cached_mget(req, &l1).await;
        }
        let key = &req.argv[1];
        if self.snapshot.rules.caching(key).is_none() {
            return false;
        }
        // Hit or miss, the forwards before this read leave first.
        self.flush_run().await;
        let (Some(l1), Some(rule)) = (&self.ctx.l1, self.snapshot.rules.caching(key)) else {
            return false;
        };
        // A hit is copied straight from the entry into the client's output:
        // no reference counts touched, no allocation.
        let (db, viewer) = (self.client.db, self.client.viewer());
        // (Hit or miss; a plain counter, a copy one read in eight.)
        self.hot.read(db, key, &self.ctx.stats.hot_keys);
        let out = &mut self.out;
        let hit = req.with_bytes(|request| {
            l1.get(db, key, viewer, request, Now::current(), |r| {
                out.put_held(r)
            })
        });
        match hit {
            Some(due) => {
                RuleStats::inc(&rule.stats.hits);
                self.tally.hits += 1;
                if due {
                    let policy = FillPolicy::of(rule).decoding(req.decode.is_some());
                    fetch!(self, l1)
                        .refresh(key.clone(), req.bytes(), policy)
                        .await;
                }
            }
            None => {
                RuleStats::inc(&rule.stats.misses);
                if let Err(e) = self.limit_upstream(req).await {
                    self.refuse(e).await;
                    return true;
                }
                let (Some(l1), Some(rule)) = (&self.ctx.l1, self.snapshot.rules.caching(key))
                else {
                    return false;
                };
                let policy = FillPolicy::of(rule).decoding(req.decode.is_some());
                let rx = fetch!(self, l1)
                    .miss(key.clone(), req.bytes(), policy)
                    .await;
                self.push_fetched(rx, req.name());
            }
        }
        true
    }

    /// MGET: the keys L1 holds from there, the rest fetched and stitched in
    /// (see `fill/mget.rs`). False when no key has a caching rule.
    async fn cached_mget(&mut self, req: &Request<'_>, l1: &Arc<cache::L1>) -> bool {
        let mut buf = std::mem::take(&mut self.scratch.mget);
        let keys = &req.argv[1..];
        let at = (self.client.db, self.client.viewer());
        let Some(mut m) = fill::mget(l1, &self.snapshot.rules, at, keys, &mut buf) else {
            self.keep_mget_buf(buf);
            return false;
        };
        self.flush_run().await;
        if m.complete() {
            self.out.put(&buf);
            self.tally.hits += 1;
        } else if let Err(e) = self.limit_upstream(req).await {
            self.keep_mget_buf(buf);
            self.refuse(e).await;
            return true;
        } else {
            let rx = fetch!(self, l1)
                .mget_rest(&mut m, keys, &buf, req.decode.as_ref())
                .await;
            self.push_fetched(rx, req.name());
        }
        self.keep_mget_buf(buf);
        fetch!(self, l1).mget_refresh(m, keys).await;
        true
    }

    /// The limits that count upstream traffic, for a read L1 does not
    /// answer whole.
    pub(super) async fn limit_upstream(&mut self, req: &Request<'_>) -> Result<(), ProxyError> {
        if self.snapshot.limits.is_empty() {
            return Ok(());
        }
        self.limit(req, Stage::Upstream).await
    }

    /// Queues the slot of a read fetched from Redis (it writes nothing).
    fn push_fetched(
        &mut self,
        rx: tokio::sync::oneshot::Receiver<crate::upstream::Replies>,
        command: &'static str,
    ) {
        self.out.push(Slot::Upstream {
            decode: None,
            rx,
            count: 1,
            blocking: false,
            inv: Invalidation::default(),
            timing: self.timing(Path::Shared, command),
        });
    }

    /// Keeps `buf` for the next MGET, unless a huge reply grew it.
    fn keep_mget_buf(&mut self, buf: Vec<u8>) {
        if buf.capacity() <= MGET_BUF_KEEP {
            self.scratch.mget = buf;
        }
    }

    /// Notes the keys a write touches: dropped from L1 now, and queued to be
    /// dropped again when Redis acknowledges the write. Inside MULTI they wait
    /// for EXEC, which is when Redis applies them.
    pub(super) fn note_write(&mut self, req: &Request<'_>, spec: &CommandSpec) {
        let Some(l1) = &self.ctx.l1 else { return };
        if !spec.has(flag::WRITE) && !spec.modifies_keys() {
            return;
        }
        let script = matches!(spec.name, "eval" | "evalsha" | "fcall");
        let mut inv = Invalidation::default();
        match spec.name {
            "flushdb" | "flushall" | "swapdb" => inv.flush = true,
            // Another database, named by an argument: rare, so keep it simple.
            "move" | "copy" => inv.flush = true,
            _ => {
                let positions = &mut self.scratch.positions;
                positions.clear();
                let extraction = key_positions(spec, &req.argv, positions);
                if !extraction.is_complete() || (script && positions.is_empty()) {
                    // A script may write keys it did not declare.
                    inv.flush = true;
                } else {
                    // A script may SELECT before it writes: its keys go in
                    // every database (as cheap as one while only one is
                    // used); so do a relayed client's after a SELECT Redis
                    // may have refused.
                    let db = if script || self.client.db_uncertain {
                        cache::ANY_DB
                    } else {
                        self.client.db
                    };
                    for &(i, _) in positions.iter() {
                        let key = &req.argv[i];
                        if self.snapshot.rules.caching(key).is_some() {
                            inv.keys.push((db, key.clone()));
                        }
                    }
                }
            }
        }
        if inv.is_empty() {
            return;
        }
        if let Mode::Transaction(_, txn) = &mut self.mode {
            txn.inv.extend(inv);
            return;
        }
        inv.apply(l1, &mut self.scratch.ids);
        self.batch.pending_inv.extend(inv);
    }

    /// EXEC dispatched: the transaction's writes are applied now.
    pub(super) fn exec_writes(&mut self, txn: Invalidation) {
        if let Some(l1) = &self.ctx.l1 {
            txn.apply(l1, &mut self.scratch.ids);
            self.batch.pending_inv.extend(txn);
        }
    }
}

/// `SET key value [options]` with an expiry added, when the key's rule has an
/// `upstream_ttl` and the command sets none itself (no EX, PX, EXAT, PXAT or
/// KEEPTTL). `None` leaves the command as the client sent it.
pub(super) fn with_upstream_ttl(rules: &Rules, argv: &[Bytes]) -> Option<Bytes> {
    if argv.len() < 3 || !argv[0].eq_ignore_ascii_case(b"set") {
        return None;
    }
    let ttl = rules.upstream_ttl(&argv[1])?;
    let has_expiry = argv[3..].iter().any(|a| {
        [&b"ex"[..], b"px", b"exat", b"pxat", b"keepttl"]
            .iter()
            .any(|o| a.eq_ignore_ascii_case(o))
    });
    if has_expiry {
        return None;
    }
    let ms = ttl.as_millis().max(1).to_string();
    let mut args: Vec<&[u8]> = argv.iter().map(|a| &a[..]).collect();
    args.push(b"PX");
    args.push(ms.as_bytes());
    Some(encode_command(&args))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Duration as Dur, RuleConfig};
    use std::time::Duration;

    #[test]
    fn upstream_ttl_is_added_only_to_sets_without_an_expiry() {
        let rules = Rules::new(
            &[RuleConfig {
                upstream_ttl: Some(Dur(Duration::from_secs(2))),
                ..RuleConfig::caching("t:", Duration::from_secs(1))
            }],
            &crate::stats::Stats::default(),
        );
        let argv = |a: &[&str]| {
            a.iter()
                .map(|s| Bytes::copy_from_slice(s.as_bytes()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            with_upstream_ttl(&rules, &argv(&["SET", "t:a", "1"])).as_deref(),
            Some(&b"*5\r\n$3\r\nSET\r\n$3\r\nt:a\r\n$1\r\n1\r\n$2\r\nPX\r\n$4\r\n2000\r\n"[..])
        );
        assert!(with_upstream_ttl(&rules, &argv(&["SET", "t:a", "1", "NX"])).is_some());
        assert!(with_upstream_ttl(&rules, &argv(&["SET", "t:a", "1", "ex", "5"])).is_none());
        assert!(with_upstream_ttl(&rules, &argv(&["SET", "t:a", "1", "KEEPTTL"])).is_none());
        assert!(with_upstream_ttl(&rules, &argv(&["SET", "other", "1"])).is_none());
        assert!(with_upstream_ttl(&rules, &argv(&["HSET", "t:a", "f", "1"])).is_none());
    }
}
