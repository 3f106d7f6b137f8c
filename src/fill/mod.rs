//! Filling L1: a missed read is fetched from Redis together with its key's
//! remaining TTL (`PTTL`) in one pipeline, once for every client waiting on
//! it, and its reply cached for as long as the rule and the key allow.
//!
//! The session decides *whether* a read is served from L1 (`session/cached.rs`);
//! this module does the fetching: single flight, the fill task, refresh-ahead,
//! and MGET split per key and stitched back together (`mget.rs`).
//!
//! Invariants enforced here (DESIGN.md, "Coherence invariants"):
//! - **No stale fill.** A fetch takes a [`FillToken`] before it goes
//!   upstream; [`L1::fill`] discards the reply if the key was invalidated
//!   meanwhile.
//! - **Single flight per generation.** A read joins a fetch in flight only if
//!   no write was acknowledged since it started (the flight id carries the
//!   key's generation, see [`L1::flight_id`]).
//! - **Never outlive Redis.** An entry lives for min(rule ttl, the key's PTTL).

mod mget;
pub mod warm;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

pub use mget::mget;

use crate::cache::{FillToken, Keep, L1, Rule, Viewer};
use crate::coherence::Bus;
use crate::protocol::ReplyScanner;
use crate::protocol::parser::parse_i64;
use crate::stats::RuleStats;
use crate::upstream::connection::Failed;
use crate::upstream::{Replies, UpstreamError, encode_command};

/// How a fetch reaches Redis: the session's own shared connection, so that
/// the fetch is ordered with the client's other commands.
pub trait Upstream {
    /// Sends `frames`, answered by `replies` reply frames; the replies are
    /// awaited by the fill task, not by the session.
    fn request(&mut self, frames: Bytes, replies: u32) -> impl Future<Output = Sent>;
}

/// A request on its way to Redis (or the reason it could not be sent).
pub struct Sent(pub Result<oneshot::Receiver<Replies>, UpstreamError>);

impl Sent {
    async fn replies(self) -> Replies {
        match self.0 {
            Ok(rx) => rx
                .await
                .unwrap_or_else(|_| Err(Failed::nothing(UpstreamError::ConnectionLost))),
            Err(e) => Err(Failed::nothing(e)),
        }
    }
}

/// Fetches in flight, by flight id: the first miss leads, the others wait
/// for its reply.
#[derive(Debug, Default)]
pub struct Flights(Mutex<HashMap<Bytes, Vec<oneshot::Sender<Replies>>>>);

/// Whether a read leads a fetch or waits for one.
#[derive(Debug)]
enum Flight {
    Leader,
    Follower(oneshot::Receiver<Replies>),
}

impl Flights {
    fn join(&self, flight_id: &[u8]) -> Flight {
        let mut inflight = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match inflight.get_mut(flight_id) {
            Some(waiters) => {
                let (tx, rx) = oneshot::channel();
                waiters.push(tx);
                Flight::Follower(rx)
            }
            None => {
                inflight.insert(Bytes::copy_from_slice(flight_id), Vec::new());
                Flight::Leader
            }
        }
    }

    /// Ends the fetch for `flight_id`, returning who waited for it.
    fn land(&self, flight_id: &[u8]) -> Vec<oneshot::Sender<Replies>> {
        let mut inflight = self.0.lock().unwrap_or_else(|e| e.into_inner());
        inflight.remove(flight_id).unwrap_or_default()
    }
}

/// What a fetch needs of its rule once the reply is in (copied, so a fill in
/// flight keeps the rule it started with whatever a reload does).
#[derive(Debug, Clone)]
pub struct FillPolicy {
    /// The rule's counters.
    pub stats: Arc<RuleStats>,
    ttl: Duration,
    negative_ttl: Option<Duration>,
    max_value_size: usize,
    refresh_ahead: Option<f64>,
    stale_if_error: Option<Duration>,
    compress_min_size: Option<usize>,
    /// The reply's values may be stored compressed: decompressed before
    /// they are filled or answered (`store_compressed`).
    decode: bool,
}

impl FillPolicy {
    /// What `rule` asks of a fill.
    pub fn of(rule: &Rule) -> Self {
        Self {
            stats: rule.stats.clone(),
            ttl: rule.ttl,
            negative_ttl: rule.negative_ttl,
            max_value_size: rule.max_value_size,
            refresh_ahead: rule.refresh_ahead,
            stale_if_error: rule.stale_if_error,
            compress_min_size: rule.compress_min_size,
            decode: crate::stored::stores_compressed(rule),
        }
    }

    /// The policy for a read whose reply is (`true`) or is not one to
    /// decompress: the rule's is right for `GET` and `MGET`, not for the
    /// other reads it caches.
    pub fn decoding(mut self, decode: bool) -> Self {
        self.decode = decode;
        self
    }

    /// The reply L1 still holds for `request` on (db, key) within the rule's
    /// stale-if-error window, for a read that failed with `error`: only
    /// when Redis is unreachable (`error`), the rule allows it, and L1 may
    /// be served at all (`l1_usable`: the bus is up or its loss policy
    /// allows serving). The caller counts it as a stale hit if it serves it.
    fn stale(
        &self,
        l1: &L1,
        (db, key): (u32, &[u8]),
        viewer: Viewer,
        request: &[u8],
        error: &UpstreamError,
        l1_usable: impl FnOnce() -> bool,
    ) -> Option<Bytes> {
        let window = self.stale_if_error?;
        if !unreachable(error) || !l1_usable() {
            return None;
        }
        l1.get_stale(db, key, viewer, request, window)
    }

    /// Caches `value` as the reply to `request` on (db, key), for as long as
    /// this policy and the key's `pttl` allow, if it caches such a value.
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        l1: &L1,
        token: FillToken,
        (db, key): (u32, &[u8]),
        viewer: Viewer,
        request: &[u8],
        value: &[u8],
        pttl: Option<i64>,
    ) -> bool {
        lifetime(self, value, pttl)
            .is_some_and(|life| l1.fill(token, db, key, &self.stats, viewer, request, value, life))
    }
}

/// What a fetch works with: the cache, the flights, the way upstream, and the
/// client's database and protocol.
pub struct Fetch<'a, U> {
    /// The cache.
    pub l1: &'a Arc<L1>,
    /// Fetches in flight.
    pub flights: &'a Arc<Flights>,
    /// The session's shared connection.
    pub upstream: U,
    /// The client's database.
    pub db: u32,
    /// Whom the replies are for (the client's protocol and user).
    pub viewer: Viewer,
    /// A reused buffer for flight ids.
    pub scratch: &'a mut Vec<u8>,
    /// The coherence bus, whose loss policy a stale-if-error reply obeys.
    pub bus: Option<&'a Arc<Bus>>,
}

/// Whether L1 may be served now as far as the bus is concerned (no bus: yes).
fn bus_allows(bus: Option<&Arc<Bus>>) -> bool {
    bus.is_none_or(|b| b.l1_usable())
}

impl<U: Upstream> Fetch<'_, U> {
    /// A missed read: fetched (with the key's PTTL, in one pipeline) unless
    /// the same read is already being fetched, in which case it waits for
    /// that. The reply arrives on the receiver.
    pub async fn miss(
        &mut self,
        key: Bytes,
        request: Bytes,
        policy: FillPolicy,
    ) -> oneshot::Receiver<Replies> {
        self.l1
            .flight_id(self.db, &key, self.viewer, &request, self.scratch);
        match self.flights.join(self.scratch) {
            Flight::Follower(rx) => rx,
            Flight::Leader => {
                let flight = Bytes::copy_from_slice(self.scratch);
                self.lead(key, request, policy, flight).await
            }
        }
    }

    /// Refresh-ahead of a hit past its refresh point: one background fetch
    /// (if none is running) replaces the entry before it expires; nobody
    /// waits for it.
    pub async fn refresh(&mut self, key: Bytes, request: Bytes, policy: FillPolicy) {
        self.l1
            .flight_id(self.db, &key, self.viewer, &request, self.scratch);
        if let Flight::Leader = self.flights.join(self.scratch) {
            let flight = Bytes::copy_from_slice(self.scratch);
            drop(self.lead(key, request, policy, flight).await);
        }
    }

    /// Sends `request` and `PTTL key` upstream as the leader of `flight`; a
    /// task fills L1 from the replies, then answers the followers and the
    /// returned receiver.
    async fn lead(
        &mut self,
        key: Bytes,
        request: Bytes,
        policy: FillPolicy,
        flight: Bytes,
    ) -> oneshot::Receiver<Replies> {
        let token = self.l1.begin_fill(self.db, &key);
        let mut frames = BytesMut::with_capacity(request.len() + key.len() + 32);
        frames.extend_from_slice(&request);
        frames.extend_from_slice(&encode_command(&[&b"PTTL"[..], &key]));
        let sent = self.upstream.request(frames.freeze(), 2).await;
        let (client_tx, client_rx) = oneshot::channel();
        let (db, viewer) = (self.db, self.viewer);
        let (l1, flights) = (self.l1.clone(), self.flights.clone());
        let bus = policy.stale_if_error.and(self.bus.cloned());
        tokio::spawn(async move {
            let mut replies = sent.replies().await;
            if policy.decode {
                replies = crate::stored::decode_replies(replies, &crate::stored::Decode::Value);
            }
            let reply = complete(replies, |value, pttl| {
                policy.fill(&l1, token, (db, &key), viewer, &request, value, pttl);
            });
            // Redis unreachable: what L1 still holds, if the rule allows.
            let reply = reply.or_else(|failed| {
                policy
                    .stale(&l1, (db, &key), viewer, &request, &failed.error, || {
                        bus_allows(bus.as_ref())
                    })
                    .inspect(|_| RuleStats::inc(&policy.stats.stale_hits))
                    .ok_or(failed)
            });
            // Land only after the fill, so a request arriving now hits.
            for waiter in flights.land(&flight) {
                let _ = waiter.send(reply.clone());
            }
            let _ = client_tx.send(reply);
        });
        client_rx
    }
}

/// The client's reply (the first frame) out of the two-frame fetch, calling
/// `fill(value, pttl)` when both frames arrived.
fn complete(replies: Replies, fill: impl FnOnce(&[u8], Option<i64>)) -> Replies {
    match replies {
        Ok(frames) => {
            let Ok(Some(len)) = ReplyScanner::new().scan(&frames) else {
                return Err(Failed::nothing(UpstreamError::InvalidReply));
            };
            fill(&frames[..len], integer(frames.get(len..)));
            Ok(frames.slice(..len))
        }
        Err(failed) if failed.got >= 1 => match ReplyScanner::new().scan(&failed.partial) {
            Ok(Some(len)) => Ok(failed.partial.slice(..len)),
            _ => Err(Failed::nothing(failed.error)),
        },
        Err(failed) => Err(Failed::nothing(failed.error)),
    }
}

/// The value of an integer reply frame (`:123\r\n`).
fn integer(frame: Option<&[u8]>) -> Option<i64> {
    frame?
        .strip_prefix(b":")
        .and_then(|f| f.strip_suffix(b"\r\n"))
        .and_then(parse_i64)
}

/// Whether `error` says Redis could not be reached or did not answer (the
/// failures stale-if-error covers), as opposed to a refusal or a reply.
fn unreachable(error: &UpstreamError) -> bool {
    error.is_outage()
        || matches!(
            error,
            UpstreamError::CircuitOpen { .. } | UpstreamError::ConnectionLost
        )
}

/// How long to keep `value`, given the key's PTTL; `None` = don't cache.
/// The stale-if-error window never reaches past the key's own expiry in
/// Redis: a key Redis expired is gone, not stale.
fn lifetime(policy: &FillPolicy, value: &[u8], pttl: Option<i64>) -> Option<Keep> {
    if value.len() > policy.max_value_size || matches!(value.first(), Some(b'-' | b'!')) {
        return None;
    }
    let stale = policy.stale_if_error.unwrap_or(Duration::ZERO);
    let (ttl, retain) = match pttl? {
        // The key does not exist: a "not found" answer, cached only if asked.
        -2 => (policy.negative_ttl?, None),
        // No expiry in Redis.
        -1 => (policy.ttl, None),
        // Never outlive Redis's own expiry.
        ms if ms > 0 => {
            let left = Duration::from_millis(ms.unsigned_abs());
            (policy.ttl.min(left), Some(left))
        }
        _ => return None,
    };
    let stale_for = retain.map_or(stale, |left| stale.min(left.saturating_sub(ttl)));
    Some(Keep {
        ttl,
        stale_for,
        refresh_ahead: policy.refresh_ahead,
        compress_min_size: policy.compress_min_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> FillPolicy {
        FillPolicy {
            stats: Arc::default(),
            ttl: Duration::from_secs(2),
            negative_ttl: None,
            max_value_size: 16,
            refresh_ahead: None,
            stale_if_error: None,
            compress_min_size: None,
            decode: false,
        }
    }

    fn fill_ttl(p: &FillPolicy, value: &[u8], pttl: Option<i64>) -> Option<Duration> {
        lifetime(p, value, pttl).map(|l| l.ttl)
    }

    #[test]
    fn the_stale_window_never_reaches_past_the_key_s_expiry_in_redis() {
        let p = FillPolicy {
            stale_if_error: Some(Duration::from_secs(30)),
            negative_ttl: Some(Duration::from_secs(1)),
            ..policy()
        };
        let stale = |pttl| lifetime(&p, b"$1\r\nx\r\n", Some(pttl)).map(|l| l.stale_for);
        assert_eq!(stale(-1), Some(Duration::from_secs(30)));
        assert_eq!(stale(5000), Some(Duration::from_secs(3)));
        assert_eq!(stale(60_000), Some(Duration::from_secs(30)));
        assert_eq!(stale(500), Some(Duration::ZERO));
        assert_eq!(
            lifetime(&p, b"$-1\r\n", Some(-2)).map(|l| (l.ttl, l.stale_for)),
            Some((Duration::from_secs(1), Duration::from_secs(30)))
        );
        assert_eq!(
            lifetime(&policy(), b"$1\r\nx\r\n", Some(-1)).map(|l| l.stale_for),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn only_an_unreachable_redis_lets_a_stale_reply_through() {
        assert!(unreachable(&UpstreamError::ConnectionLost));
        assert!(unreachable(&UpstreamError::Timeout(Duration::from_secs(1))));
        assert!(unreachable(&UpstreamError::Unavailable("refused".into())));
        assert!(unreachable(&UpstreamError::CircuitOpen {
            cause: "refused".into(),
            retry_in: Duration::from_millis(5)
        }));
        assert!(!unreachable(&UpstreamError::Rejected("-WRONGPASS".into())));
        assert!(!unreachable(&UpstreamError::Busy("-BUSY".into())));
        assert!(!unreachable(&UpstreamError::InvalidReply));
    }

    #[test]
    fn entries_never_outlive_the_key_in_redis() {
        let p = policy();
        assert_eq!(
            fill_ttl(&p, b"$1\r\nx\r\n", Some(500)),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            fill_ttl(&p, b"$1\r\nx\r\n", Some(5000)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            fill_ttl(&p, b"$1\r\nx\r\n", Some(-1)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(fill_ttl(&p, b"$1\r\nx\r\n", Some(0)), None);
        assert_eq!(fill_ttl(&p, b"$1\r\nx\r\n", None), None);
    }

    #[test]
    fn missing_keys_errors_and_large_values_are_not_cached_by_default() {
        let p = policy();
        assert_eq!(fill_ttl(&p, b"$-1\r\n", Some(-2)), None);
        let negative = FillPolicy {
            negative_ttl: Some(Duration::from_millis(100)),
            ..policy()
        };
        assert_eq!(
            fill_ttl(&negative, b"$-1\r\n", Some(-2)),
            Some(Duration::from_millis(100))
        );
        assert_eq!(fill_ttl(&p, b"-WRONGTYPE x\r\n", Some(-1)), None);
        assert_eq!(fill_ttl(&p, &[b'x'; 17], Some(-1)), None);
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

    #[test]
    fn one_leader_per_flight() {
        let f = Flights::default();
        assert!(matches!(f.join(b"id"), Flight::Leader));
        assert!(matches!(f.join(b"id"), Flight::Follower(_)));
        assert!(matches!(f.join(b"id"), Flight::Follower(_)));
        assert_eq!(f.land(b"id").len(), 2);
        assert!(matches!(f.join(b"id"), Flight::Leader));
    }
}
