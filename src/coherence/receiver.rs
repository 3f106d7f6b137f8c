//! The receiving side of the bus: peers' messages applied to L1, sequence
//! gaps and silent peers flushed, our own heartbeat's echo noted.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use super::message::{DecodeError, Kind, Message};
use super::{BusStats, now_us};
use crate::cache::{ANY_DB, L1};

/// Applies peers' messages to L1.
pub(super) struct Receiver {
    pub(super) me: String,
    pub(super) l1: Arc<L1>,
    pub(super) stats: Arc<BusStats>,
    pub(super) last_echo_us: Arc<AtomicU64>,
    pub(super) peer_timeout: Duration,
}

/// Applies peers' messages to L1, and watches peers' heartbeats.
pub(super) async fn receive(mut sub: async_nats::Subscriber, r: Receiver) {
    use futures_util::StreamExt;
    let Receiver {
        me,
        l1,
        stats,
        last_echo_us,
        peer_timeout,
    } = r;
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut last_seen: HashMap<String, Instant> = HashMap::new();
    let mut scratch = Vec::new();
    let mut check = tokio::time::interval(peer_timeout / 4);
    loop {
        let msg = tokio::select! {
            msg = sub.next() => match msg {
                Some(msg) => msg,
                None => return,
            },
            _ = check.tick() => {
                // A silent peer may have acknowledged writes it never
                // published (frozen, crashed): drop everything it could have
                // invalidated. If it comes back, its next message is a gap.
                let silent: Vec<String> = last_seen
                    .iter()
                    .filter(|(_, t)| t.elapsed() > peer_timeout)
                    .map(|(p, _)| p.clone())
                    .collect();
                for peer in silent {
                    tracing::warn!(%peer, "peer silent past peer_timeout; flushing L1");
                    last_seen.remove(&peer);
                    last_seq.remove(&peer);
                    l1.flush();
                    stats.silent_peers.fetch_add(1, SeqCst);
                    stats.flushes.fetch_add(1, SeqCst);
                }
                continue;
            }
        };
        // Our own messages come back (NATS echoes them): only the send time
        // matters, so their entries are not decoded.
        if let Some((sender, sent_at_us)) = Message::peek_sender(&msg.payload) {
            if sender == me.as_bytes() {
                last_echo_us.fetch_max(sent_at_us, SeqCst);
                continue;
            }
        }
        let m = match Message::decode(msg.payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable invalidation message; flushing L1");
                l1.flush();
                stats.flushes.fetch_add(1, SeqCst);
                // A newer kind's header is readable: the flush covers it, and
                // the peer's next message is no gap.
                if let DecodeError::NewerKind { instance, seq, .. } = e {
                    last_seen.insert(instance.clone(), Instant::now());
                    last_seq.insert(instance, seq);
                }
                continue;
            }
        };
        last_seen.insert(m.instance.clone(), Instant::now());
        stats.received.fetch_add(1, SeqCst);
        let prev = last_seq.insert(m.instance.clone(), m.seq);
        // A gap (or a first message that is not the peer's first) means a
        // message was lost: anything might be stale.
        let expected = prev.map_or(1, |p| p + 1);
        if m.seq > expected {
            if prev.is_some() {
                tracing::warn!(peer = %m.instance, expected, got = m.seq, "invalidation gap; flushing L1");
            } else {
                // A peer that ran before this instance joined, or one
                // forgotten as silent (which was warned about then): the
                // flush is the documented cost of joining, not a loss.
                tracing::info!(peer = %m.instance, got = m.seq, "invalidation gap; flushing L1 (first message heard from this peer)");
            }
            stats.gaps.fetch_add(1, SeqCst);
            stats.flushes.fetch_add(1, SeqCst);
            l1.flush();
        }
        match m.kind {
            Kind::Keys | Kind::AnyDbKeys => {
                // (A kind 6 entry's database is ANY_DB.)
                for (db, key) in &m.entries {
                    let db = if m.kind == Kind::AnyDbKeys {
                        ANY_DB
                    } else {
                        *db
                    };
                    l1.invalidate_at(db, key, &mut scratch);
                }
                stats.applied_keys.fetch_add(m.entries.len() as u64, SeqCst);
            }
            Kind::Flush => {
                l1.flush();
                stats.flushes.fetch_add(1, SeqCst);
            }
            Kind::Pattern => {
                for (_, pattern) in &m.entries {
                    let n = l1.invalidate_matching(pattern);
                    stats.applied_keys.fetch_add(n as u64, SeqCst);
                }
            }
            // A heartbeat: not an invalidation, so no delay to count.
            Kind::Resync => continue,
            Kind::Leave => {
                last_seen.remove(&m.instance);
                last_seq.remove(&m.instance);
                stats.peers_left.fetch_add(1, SeqCst);
                tracing::info!(peer = %m.instance, "peer left the bus");
                continue;
            }
        }
        stats.delay_us.record(now_us().saturating_sub(m.sent_at_us));
    }
}
