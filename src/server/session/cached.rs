//! The cache phases of the request path: serve a read from L1 (or fetch it
//! once for every client waiting), and note the keys a write touches.
//!
//! Invariants enforced here (DESIGN.md, "Coherence invariants"):
//! - **Read your writes.** A write's keys are dropped from L1 when it is
//!   dispatched (so the writer's own pipelined reads miss) and again when
//!   Redis acknowledges it, before the client sees the reply (so a read that
//!   raced the write cannot leave the old value behind).
//! - **No stale fill.** A miss takes a [`FillToken`](crate::cache::FillToken)
//!   before it goes upstream; the fill is discarded if the key was
//!   invalidated meanwhile.
//! - Pinned clients (MULTI, WATCH, pub/sub, tracking) never read from L1:
//!   they see Redis's semantics exactly.

use std::io::Write as _;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use super::Session;
use crate::cache::{self, Flight, Invalidation, L1, Now, RuleStats};
use crate::command::keys::key_positions;
use crate::command::{CommandSpec, flag};
use crate::protocol::ReplyScanner;
use crate::protocol::parser::parse_i64;
use crate::server::outbox::Slot;
use crate::upstream::connection::Failed;
use crate::upstream::{Op, Replies, UpstreamError, encode_command};

/// What a fetch needs of its rule once the reply is in.
#[derive(Clone, Copy)]
struct FillPolicy {
    rule: usize,
    ttl: Duration,
    negative_ttl: Option<Duration>,
    max_value_size: usize,
    refresh_ahead: Option<f64>,
}

impl FillPolicy {
    /// What rule number `rule` (`r`) asks of a fill.
    fn of(rule: usize, r: &cache::Rule) -> Self {
        Self {
            rule,
            ttl: r.ttl,
            negative_ttl: r.negative_ttl,
            max_value_size: r.max_value_size,
            refresh_ahead: r.refresh_ahead,
        }
    }

    /// Caches `value` as the reply to `request` on (db, key), for as long as
    /// this policy and the key's `pttl` allow, if it caches such a value.
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        l1: &L1,
        token: cache::FillToken,
        (db, key): (u32, &[u8]),
        proto: crate::protocol::Protocol,
        request: &[u8],
        value: &[u8],
        pttl: Option<i64>,
    ) {
        if let Some(ttl) = fill_ttl(self, value, pttl) {
            let refresh = self.refresh_ahead;
            l1.fill(
                token, db, key, self.rule, proto, request, value, ttl, refresh,
            );
        }
    }
}

/// A request sent on the shared connection, awaited by a fetch task.
struct Sent(Result<oneshot::Receiver<Replies>, UpstreamError>);

impl Sent {
    async fn replies(self) -> Replies {
        match self.0 {
            Ok(rx) => rx
                .await
                .unwrap_or_else(|_| Err(lost(UpstreamError::ConnectionLost))),
            Err(e) => Err(lost(e)),
        }
    }
}

impl Session {
    /// Sends `frames` (answered by `replies` frames) on the shared connection;
    /// the result is awaited by a task, not by the session.
    async fn request(&mut self, frames: Bytes, replies: u32) -> Sent {
        let (op, rx) = Op::request(frames, replies, false);
        let sent = match self.shared_conn().await {
            Ok(conn) => conn.send(op).map_err(|_| UpstreamError::ConnectionLost),
            Err(e) => Err(e),
        };
        Sent(sent.map(|()| rx))
    }

    /// Serves a cacheable read from L1, or fetches it. Returns false when the
    /// command is not one L1 handles (the caller forwards it as usual).
    pub(super) async fn cached_read(
        &mut self,
        chunk: &Bytes,
        frame: &Option<Range<usize>>,
        spec: &CommandSpec,
    ) -> bool {
        // Cheap checks first: most forwarded commands are not cacheable reads,
        // and they should not pay even for the Arc clone below.
        if self.ctx.l1.is_none() || self.pin.is_some() || self.argv.len() < 2 {
            return false;
        }
        // Bus down: L1 follows the loss policy (by default, not served).
        if self.ctx.bus.as_ref().is_some_and(|bus| !bus.l1_usable()) {
            return false;
        }
        let mget = spec.name == "mget";
        if !mget && (!spec.has(flag::CACHEABLE) || (spec.name == "exists" && self.argv.len() != 2))
        {
            return false;
        }
        if mget {
            let Some(l1) = self.ctx.l1.clone() else {
                return false;
            };
            return self.cached_mget(chunk, l1).await;
        }
        let Some(policy) = self.ctx.l1.as_deref().and_then(|l1| {
            let (index, rule) = l1.rule_for(&self.argv[1])?;
            Some(FillPolicy::of(index, rule))
        }) else {
            return false;
        };
        // Hit or miss, the forwards before this read leave first.
        self.flush_run(chunk).await;
        let Some(l1) = self.ctx.l1.as_deref() else {
            return false;
        };
        // Inline commands have no frame to compare: re-encoded once.
        let encoded = frame.is_none().then(|| encode_command(&self.argv));
        let request = encoded
            .as_deref()
            .unwrap_or_else(|| &chunk[frame.clone().unwrap_or_default()]);
        // A hit is copied straight from the entry into the client's output:
        // no reference counts touched, no allocation.
        let out = &mut self.out;
        let hit = l1.get(
            self.db,
            &self.argv[1],
            self.proto,
            request,
            Now::current(),
            |reply| out.put(reply),
        );
        let stats = l1.stats(policy.rule);
        match hit {
            Some(false) => {
                RuleStats::inc(&stats.hits);
                return true;
            }
            Some(true) => RuleStats::inc(&stats.hits),
            None => RuleStats::inc(&stats.misses),
        }
        let Some(l1) = self.ctx.l1.clone() else {
            return false;
        };
        let key = self.argv[1].clone();
        let request = encoded.unwrap_or_else(|| chunk.slice(frame.clone().unwrap_or_default()));
        if hit.is_some() {
            // Refresh-ahead: one background fetch (if none is running)
            // replaces the entry before it expires; nobody waits for it.
            l1.flight_id(self.db, &key, self.proto, &request, &mut self.scratch);
            if let Flight::Leader = l1.join(&self.scratch) {
                let flight = Bytes::copy_from_slice(&self.scratch);
                drop(
                    self.start_fetch(l1.clone(), key, request, policy, flight)
                        .await,
                );
            }
            return true;
        }
        self.fetch(l1, key, request, policy).await;
        true
    }

    /// Fetches a missed read (with the key's PTTL, in one pipeline) unless the
    /// same read is already being fetched, in which case it waits for that.
    async fn fetch(&mut self, l1: Arc<L1>, key: Bytes, request: Bytes, policy: FillPolicy) {
        l1.flight_id(self.db, &key, self.proto, &request, &mut self.scratch);
        let rx = match l1.join(&self.scratch) {
            Flight::Follower(rx) => rx,
            Flight::Leader => {
                let flight = Bytes::copy_from_slice(&self.scratch);
                self.start_fetch(l1, key, request, policy, flight).await
            }
        };
        self.push(Slot::Upstream {
            rx,
            count: 1,
            blocking: false,
            inv: Invalidation::default(),
        });
    }

    /// Sends `request` and `PTTL key` upstream as the leader of `flight`; a
    /// task fills L1 from the replies, then answers the followers and the
    /// returned receiver.
    async fn start_fetch(
        &mut self,
        l1: Arc<L1>,
        key: Bytes,
        request: Bytes,
        policy: FillPolicy,
        flight: Bytes,
    ) -> oneshot::Receiver<Replies> {
        let token = l1.begin_fill(self.db, &key);
        let mut frames = BytesMut::with_capacity(request.len() + key.len() + 32);
        frames.extend_from_slice(&request);
        frames.extend_from_slice(&encode_command(&[&b"PTTL"[..], &key]));
        let sent = self.request(frames.freeze(), 2).await;
        let (client_tx, client_rx) = oneshot::channel();
        let (db, proto) = (self.db, self.proto);
        tokio::spawn(async move {
            let replies = sent.replies().await;
            let reply = complete(replies, |value, pttl| {
                policy.fill(&l1, token, (db, &key), proto, &request, value, pttl);
            });
            // Land only after the fill, so a request arriving now hits.
            for waiter in l1.land(&flight) {
                let _ = waiter.send(reply.clone());
            }
            let _ = client_tx.send(reply);
        });
        client_rx
    }

    /// MGET, served per key: cached keys from L1, the rest fetched (with their
    /// PTTLs) in one pipeline, each cached on its own, and the reply stitched
    /// back together in order. Returns false when no key has a caching rule.
    async fn cached_mget(&mut self, chunk: &Bytes, l1: Arc<L1>) -> bool {
        let n = self.argv.len() - 1;
        let now = Now::current();
        // Hits are copied into one reused buffer after the reply's header:
        // when every key hits, that buffer is the whole reply.
        let mut buf = std::mem::take(&mut self.mget_buf);
        buf.clear();
        let _ = write!(buf, "*{n}\r\n");
        let mut spans: Vec<Option<Range<usize>>> = Vec::with_capacity(n);
        let mut missing: Vec<(usize, Option<(FillPolicy, crate::cache::FillToken)>)> = Vec::new();
        // Hits due for a refresh-ahead.
        let mut refresh: Vec<(usize, FillPolicy)> = Vec::new();
        let mut any_rule = false;
        for i in 0..n {
            let key = &self.argv[i + 1];
            let Some((index, rule)) = l1.rule_for(key) else {
                spans.push(None);
                missing.push((i, None));
                continue;
            };
            any_rule = true;
            let stats = l1.stats(index);
            let policy = FillPolicy::of(index, rule);
            let start = buf.len();
            let hit = l1.get(self.db, key, self.proto, MGET_ELEMENT, now, |e| {
                buf.extend_from_slice(e)
            });
            match hit {
                Some(due) => {
                    RuleStats::inc(&stats.hits);
                    spans.push(Some(start..buf.len()));
                    if due {
                        refresh.push((i, policy));
                    }
                }
                None => {
                    RuleStats::inc(&stats.misses);
                    spans.push(None);
                    missing.push((i, Some((policy, l1.begin_fill(self.db, key)))));
                }
            }
        }
        if !any_rule {
            self.keep_mget_buf(buf);
            return false;
        }
        self.flush_run(chunk).await;
        if missing.is_empty() {
            self.out.put(&buf);
            self.keep_mget_buf(buf);
            self.refresh_elements(&l1, refresh).await;
            return true;
        }
        let cached = Bytes::copy_from_slice(&buf);
        self.keep_mget_buf(buf);
        let parts: Vec<Option<Bytes>> = spans
            .into_iter()
            .map(|span| span.map(|r| cached.slice(r)))
            .collect();
        let keys: Vec<Bytes> = self.argv[1..].to_vec();
        // One pipeline: MGET of the missing keys, then PTTL of each that a
        // rule caches (the others are only passed through).
        let mut mget: Vec<&[u8]> = vec![b"MGET"];
        mget.extend(missing.iter().map(|(i, _)| &keys[*i][..]));
        let mut frames = BytesMut::from(&encode_command(&mget)[..]);
        let mut pttls = 0;
        for (i, fill) in &missing {
            if fill.is_some() {
                frames.extend_from_slice(&encode_command(&[&b"PTTL"[..], &keys[*i]]));
                pttls += 1;
            }
        }
        let count = u32::try_from(pttls + 1).unwrap_or(u32::MAX);
        let sent = self.request(frames.freeze(), count).await;
        let (client_tx, client_rx) = oneshot::channel();
        let (db, proto, task_l1) = (self.db, self.proto, l1.clone());
        tokio::spawn(async move {
            let l1 = task_l1;
            let replies = sent.replies().await;
            let reply = match replies {
                Ok(frames) => match split_mget(&frames, missing.len(), pttls) {
                    Some((elements, pttls)) => {
                        let mut pttls = pttls.iter();
                        for ((i, fill), element) in missing.iter().zip(&elements) {
                            if let Some((policy, token)) = fill {
                                let pttl = pttls.next().copied().flatten();
                                let at = (db, &keys[*i][..]);
                                policy.fill(&l1, *token, at, proto, MGET_ELEMENT, element, pttl);
                            }
                        }
                        let fetched: Vec<(usize, &[u8])> = missing
                            .iter()
                            .map(|(i, _)| *i)
                            .zip(elements.iter().copied())
                            .collect();
                        Ok(stitch(&parts, &fetched))
                    }
                    // An error reply (or something unexpected): pass MGET's
                    // own first frame through, uncached.
                    None => match ReplyScanner::new().scan(&frames) {
                        Ok(Some(len)) => Ok(frames.slice(..len)),
                        _ => Err(lost(UpstreamError::InvalidReply)),
                    },
                },
                Err(failed) => Err(lost(failed.error)),
            };
            let _ = client_tx.send(reply);
        });
        self.push(Slot::Upstream {
            rx: client_rx,
            count: 1,
            blocking: false,
            inv: Invalidation::default(),
        });
        self.refresh_elements(&l1, refresh).await;
        true
    }

    /// Refresh-ahead of the keys an MGET served from L1 that are due for it
    /// (`(argument index - 1, policy)` pairs), after its reply is queued.
    async fn refresh_elements(&mut self, l1: &Arc<L1>, due: Vec<(usize, FillPolicy)>) {
        for (i, policy) in due {
            let key = self.argv[i + 1].clone();
            self.refresh_element(l1, key, policy).await;
        }
    }

    /// Refresh-ahead of one key an MGET served from L1: `MGET key` and
    /// `PTTL key` in the background, filling the key's MGET element, unless
    /// a refresh of it is already running. Nobody waits for it.
    async fn refresh_element(&mut self, l1: &Arc<L1>, key: Bytes, policy: FillPolicy) {
        l1.flight_id(self.db, &key, self.proto, MGET_ELEMENT, &mut self.scratch);
        let Flight::Leader = l1.join(&self.scratch) else {
            return;
        };
        let flight = Bytes::copy_from_slice(&self.scratch);
        let token = l1.begin_fill(self.db, &key);
        let mut frames = BytesMut::from(&encode_command(&[&b"MGET"[..], &key])[..]);
        frames.extend_from_slice(&encode_command(&[&b"PTTL"[..], &key]));
        let sent = self.request(frames.freeze(), 2).await;
        let (db, proto, l1) = (self.db, self.proto, l1.clone());
        tokio::spawn(async move {
            if let Ok(frames) = sent.replies().await {
                if let Some((elements, pttls)) = split_mget(&frames, 1, 1) {
                    let (element, pttl) = (elements[0], pttls[0]);
                    policy.fill(&l1, token, (db, &key), proto, MGET_ELEMENT, element, pttl);
                }
            }
            // Only refreshes join this flight, and none of them waits.
            drop(l1.land(&flight));
        });
    }

    /// Keeps `buf` for the next MGET, unless a huge reply grew it.
    fn keep_mget_buf(&mut self, buf: Vec<u8>) {
        if buf.capacity() <= MGET_BUF_KEEP {
            self.mget_buf = buf;
        }
    }

    /// Notes the keys a write touches: dropped from L1 now, and queued to be
    /// dropped again when Redis acknowledges the write. Inside MULTI they wait
    /// for EXEC, which is when Redis applies them.
    pub(super) fn note_write(&mut self, spec: &CommandSpec) {
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
                self.positions.clear();
                let extraction = key_positions(spec, &self.argv, &mut self.positions);
                if !extraction.is_complete() || (script && self.positions.is_empty()) {
                    // A script may write keys it did not declare.
                    inv.flush = true;
                } else {
                    // A script may SELECT before it writes: its keys go in
                    // every database (as cheap as one while only one is
                    // used); so do a relayed client's after a SELECT Redis
                    // may have refused.
                    let db = if script || self.relay.db_uncertain {
                        cache::ANY_DB
                    } else {
                        self.db
                    };
                    for &(i, _) in &self.positions {
                        let key = &self.argv[i];
                        if l1.rule_for(key).is_some() {
                            inv.keys.push((db, key.clone()));
                        }
                    }
                }
            }
        }
        if inv.is_empty() {
            return;
        }
        if let Some(pin) = self.pin.as_mut().filter(|p| p.in_multi) {
            pin.txn_inv.extend(inv);
            return;
        }
        inv.apply(l1, &mut self.scratch);
        self.pending_inv.extend(inv);
    }

    /// EXEC dispatched: the transaction's writes are applied now.
    pub(super) fn exec_writes(&mut self) {
        let Some(l1) = &self.ctx.l1 else { return };
        if let Some(pin) = self.pin.as_mut() {
            let txn = std::mem::take(&mut pin.txn_inv);
            txn.apply(l1, &mut self.scratch);
            self.pending_inv.extend(txn);
        }
    }
}

/// The largest MGET buffer a session keeps between requests.
const MGET_BUF_KEEP: usize = 64 * 1024;

/// The variant under which one key's element of an MGET reply is cached (not
/// a real request: MGET answers nil for non-strings where GET errors, so the
/// two must not share entries).
const MGET_ELEMENT: &[u8] = b"\0mget-element";

/// An MGET reply's elements and the PTTL of each key.
type MgetReplies<'a> = (Vec<&'a [u8]>, Vec<Option<i64>>);

/// Splits `*k` + k elements, then `p` PTTL integers; None unless it is
/// exactly that.
fn split_mget(frames: &[u8], k: usize, p: usize) -> Option<MgetReplies<'_>> {
    let rest = frames.strip_prefix(b"*")?;
    let nl = rest.iter().position(|&b| b == b'\r')?;
    if parse_i64(&rest[..nl])? != i64::try_from(k).ok()? {
        return None;
    }
    let mut at = 1 + nl + 2;
    let mut elements = Vec::with_capacity(k);
    for _ in 0..k {
        let len = ReplyScanner::new().scan(frames.get(at..)?).ok()??;
        elements.push(&frames[at..at + len]);
        at += len;
    }
    let mut pttls = Vec::with_capacity(p);
    for _ in 0..p {
        let len = ReplyScanner::new().scan(frames.get(at..)?).ok()??;
        let frame = &frames[at..at + len];
        pttls.push(
            frame
                .strip_prefix(b":")
                .and_then(|f| f.strip_suffix(b"\r\n"))
                .and_then(parse_i64),
        );
        at += len;
    }
    Some((elements, pttls))
}

/// An MGET reply from cached parts and fetched `(index, element)` pairs.
fn stitch(parts: &[Option<Bytes>], fetched: &[(usize, &[u8])]) -> Bytes {
    let mut out =
        BytesMut::with_capacity(16 + parts.iter().flatten().map(|p| p.len()).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
    let mut fetched = fetched.iter().peekable();
    for (i, part) in parts.iter().enumerate() {
        match part {
            Some(bytes) => out.extend_from_slice(bytes),
            None => {
                if let Some((_, element)) = fetched.next_if(|(j, _)| *j == i) {
                    out.extend_from_slice(element);
                }
            }
        }
    }
    out.freeze()
}

/// `SET key value [options]` with an expiry added, when the key's rule has an
/// `upstream_ttl` and the command sets none itself (no EX, PX, EXAT, PXAT or
/// KEEPTTL). `None` leaves the command as the client sent it.
pub(super) fn with_upstream_ttl(l1: &L1, argv: &[Bytes]) -> Option<Bytes> {
    if argv.len() < 3 || !argv[0].eq_ignore_ascii_case(b"set") {
        return None;
    }
    let ttl = l1.upstream_ttl(&argv[1])?;
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

/// The client's reply (the first frame) out of the two-frame fetch, calling
/// `fill(value, pttl)` when both frames arrived.
fn complete(replies: Replies, fill: impl FnOnce(&[u8], Option<i64>)) -> Replies {
    match replies {
        Ok(frames) => {
            let Ok(Some(len)) = ReplyScanner::new().scan(&frames) else {
                return Err(lost(UpstreamError::InvalidReply));
            };
            let pttl = frames
                .get(len..)
                .and_then(|f| f.strip_prefix(b":"))
                .and_then(|f| f.strip_suffix(b"\r\n"))
                .and_then(parse_i64);
            fill(&frames[..len], pttl);
            Ok(frames.slice(..len))
        }
        Err(failed) if failed.got >= 1 => match ReplyScanner::new().scan(&failed.partial) {
            Ok(Some(len)) => Ok(failed.partial.slice(..len)),
            _ => Err(lost(failed.error)),
        },
        Err(failed) => Err(lost(failed.error)),
    }
}

/// How long to keep `value`, given the key's PTTL; `None` = don't cache.
fn fill_ttl(policy: &FillPolicy, value: &[u8], pttl: Option<i64>) -> Option<Duration> {
    if value.len() > policy.max_value_size || matches!(value.first(), Some(b'-' | b'!')) {
        return None;
    }
    match pttl? {
        // The key does not exist: a "not found" answer, cached only if asked.
        -2 => policy.negative_ttl,
        // No expiry in Redis.
        -1 => Some(policy.ttl),
        // Never outlive Redis's own expiry.
        ms if ms > 0 => Some(policy.ttl.min(Duration::from_millis(ms.unsigned_abs()))),
        _ => None,
    }
}

fn lost(error: UpstreamError) -> Failed {
    Failed::nothing(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: FillPolicy = FillPolicy {
        rule: 0,
        ttl: Duration::from_secs(2),
        negative_ttl: None,
        max_value_size: 16,
        refresh_ahead: None,
    };

    #[test]
    fn entries_never_outlive_the_key_in_redis() {
        assert_eq!(
            fill_ttl(&POLICY, b"$1\r\nx\r\n", Some(500)),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            fill_ttl(&POLICY, b"$1\r\nx\r\n", Some(5000)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            fill_ttl(&POLICY, b"$1\r\nx\r\n", Some(-1)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(fill_ttl(&POLICY, b"$1\r\nx\r\n", Some(0)), None);
        assert_eq!(fill_ttl(&POLICY, b"$1\r\nx\r\n", None), None);
    }

    #[test]
    fn missing_keys_errors_and_large_values_are_not_cached_by_default() {
        assert_eq!(fill_ttl(&POLICY, b"$-1\r\n", Some(-2)), None);
        let negative = FillPolicy {
            negative_ttl: Some(Duration::from_millis(100)),
            ..POLICY
        };
        assert_eq!(
            fill_ttl(&negative, b"$-1\r\n", Some(-2)),
            Some(Duration::from_millis(100))
        );
        assert_eq!(fill_ttl(&POLICY, b"-WRONGTYPE x\r\n", Some(-1)), None);
        assert_eq!(fill_ttl(&POLICY, &[b'x'; 17], Some(-1)), None);
    }

    #[test]
    fn upstream_ttl_is_added_only_to_sets_without_an_expiry() {
        use crate::config::{ByteSize, CacheConfig, Duration as Dur, RuleConfig};
        let l1 = L1::new(&CacheConfig {
            max_memory: ByteSize(1 << 20),
            rules: vec![RuleConfig {
                max_value_size: ByteSize(1024),
                upstream_ttl: Some(Dur(Duration::from_secs(2))),
                ..RuleConfig::caching("t:", Duration::from_secs(1))
            }],
        })
        .expect("caching rule");
        let argv = |a: &[&str]| {
            a.iter()
                .map(|s| Bytes::copy_from_slice(s.as_bytes()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            with_upstream_ttl(&l1, &argv(&["SET", "t:a", "1"])).as_deref(),
            Some(&b"*5\r\n$3\r\nSET\r\n$3\r\nt:a\r\n$1\r\n1\r\n$2\r\nPX\r\n$4\r\n2000\r\n"[..])
        );
        assert!(with_upstream_ttl(&l1, &argv(&["SET", "t:a", "1", "NX"])).is_some());
        assert!(with_upstream_ttl(&l1, &argv(&["SET", "t:a", "1", "ex", "5"])).is_none());
        assert!(with_upstream_ttl(&l1, &argv(&["SET", "t:a", "1", "KEEPTTL"])).is_none());
        assert!(with_upstream_ttl(&l1, &argv(&["SET", "other", "1"])).is_none());
        assert!(with_upstream_ttl(&l1, &argv(&["HSET", "t:a", "f", "1"])).is_none());
    }

    #[test]
    fn mget_replies_split_and_stitch_in_order() {
        let frames = b"*2\r\n$1\r\na\r\n$-1\r\n:-1\r\n:-2\r\n";
        let (elements, pttls) = split_mget(frames, 2, 2).expect("well formed");
        assert_eq!(elements, vec![&b"$1\r\na\r\n"[..], &b"$-1\r\n"[..]]);
        assert_eq!(pttls, vec![Some(-1), Some(-2)]);
        assert!(split_mget(b"-ERR x\r\n", 2, 2).is_none());
        // Fewer PTTLs than elements (keys no rule caches get none).
        let (elements, pttls) =
            split_mget(b"*2\r\n$1\r\na\r\n$1\r\nb\r\n:-1\r\n", 2, 1).expect("well formed");
        assert_eq!((elements.len(), pttls), (2, vec![Some(-1)]));
        let parts = [None, Some(Bytes::from_static(b"$1\r\nb\r\n")), None];
        let out = stitch(&parts, &[(0, &b"$1\r\na\r\n"[..]), (2, &b"$-1\r\n"[..])]);
        assert_eq!(&out[..], b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$-1\r\n");
    }

    #[test]
    fn the_client_gets_only_its_own_reply() {
        let mut seen = None;
        let r = complete(Ok(Bytes::from_static(b"$1\r\nv\r\n:1500\r\n")), |v, p| {
            seen = Some((v.to_vec(), p))
        });
        assert_eq!(r.ok().as_deref(), Some(&b"$1\r\nv\r\n"[..]));
        assert_eq!(seen, Some((b"$1\r\nv\r\n".to_vec(), Some(1500))));
    }
}
