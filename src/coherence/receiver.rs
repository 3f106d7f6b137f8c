//! The receiving side of the bus: peers' messages applied to L1, sequence
//! gaps and silent peers flushed, our own heartbeat's echo noted.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
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
    pub(super) missing: Missing,
    pub(super) healthy: Arc<AtomicBool>,
    pub(super) start: Instant,
    pub(super) connected_at_ms: Arc<AtomicU64>,
    pub(super) bypass_until_ms: Arc<AtomicU64>,
}

/// Peers forgotten as silent that may still be writing: one cut off from
/// NATS alone goes on acknowledging writes whose invalidations cannot reach
/// anyone, and nothing here tells it from a dead one. Until each is heard
/// again (its next message shows the gap and flushes), or a grace passes,
/// L1 is not served. The grace — the NATS client's longest reconnect delay
/// plus `peer_timeout` — is how long a live peer can stay unheard once NATS
/// is reachable, and it runs from the later of the forgetting and this
/// instance's own latest reconnect: after a NATS outage every instance
/// reconnects on its own schedule, and one that is back first must not
/// serve what a peer still reconnecting overwrites meanwhile. A dead peer
/// costs every other instance at most the grace of reads from Redis. A peer
/// cut off for longer than the grace can still leave stale values until it
/// is back (`redis_tracking` covers that case).
#[derive(Debug)]
pub(super) struct Missing {
    /// Forgotten peers and when (ms since the bus started).
    peers: HashMap<String, u64>,
    grace_ms: u64,
}

impl Missing {
    pub(super) fn new(grace: Duration) -> Self {
        Self {
            peers: HashMap::new(),
            grace_ms: grace.as_millis() as u64,
        }
    }

    fn forgot(&mut self, peer: String, now_ms: u64) {
        self.peers.insert(peer, now_ms);
    }

    fn heard(&mut self, peer: &str) -> bool {
        self.peers.remove(peer).is_some()
    }

    /// Until when (ms) L1 is not served, 0 for no longer; while connected
    /// (`connected_at_ms`), peers past their grace are given up on.
    fn until(&mut self, now_ms: u64, connected_at_ms: Option<u64>) -> u64 {
        let grace = self.grace_ms;
        let deadline = |forgot: u64| {
            forgot
                .max(connected_at_ms.unwrap_or(u64::MAX))
                .saturating_add(grace)
        };
        if connected_at_ms.is_some() {
            self.peers.retain(|_, forgot| deadline(*forgot) > now_ms);
        }
        match self.peers.values().map(|f| deadline(*f)).max() {
            Some(until) => until.max(1),
            None => 0,
        }
    }

    fn len(&self) -> usize {
        self.peers.len()
    }
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
        mut missing,
        healthy,
        start,
        connected_at_ms,
        bypass_until_ms,
    } = r;
    // Publishes how long L1 must wait for missing peers.
    let settle = |missing: &mut Missing| {
        let now_ms = start.elapsed().as_millis() as u64;
        let connected = healthy.load(SeqCst).then(|| connected_at_ms.load(SeqCst));
        bypass_until_ms.store(missing.until(now_ms, connected), SeqCst);
        stats.awaiting_peers.store(missing.len() as u64, SeqCst);
    };
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
                    stats.peer_gone(&peer);
                    last_seq.remove(&peer);
                    // (No read fills L1 from here until the peer is back.)
                    missing.forgot(peer, start.elapsed().as_millis() as u64);
                    settle(&mut missing);
                    l1.flush();
                    stats.silent_peers.fetch_add(1, SeqCst);
                    stats.flushes.fetch_add(1, SeqCst);
                }
                settle(&mut missing);
                stats.live_peers.store(last_seen.len() as u64, SeqCst);
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
        stats.live_peers.store(last_seen.len() as u64, SeqCst);
        stats.received.fetch_add(1, SeqCst);
        stats.peer_heard(&m.instance, now_us().saturating_sub(m.sent_at_us));
        // (Back: its message shows its gap, which flushes, below.)
        let returned = missing.heard(&m.instance);
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
        if returned {
            settle(&mut missing);
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
                stats.peer_gone(&m.instance);
                stats.live_peers.store(last_seen.len() as u64, SeqCst);
                last_seq.remove(&m.instance);
                stats.peers_left.fetch_add(1, SeqCst);
                tracing::info!(peer = %m.instance, "peer left the bus");
                continue;
            }
        }
        stats.delay_us.record(now_us().saturating_sub(m.sent_at_us));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_peer_holds_l1_back_until_heard_or_its_grace_ends() {
        let mut m = Missing::new(Duration::from_millis(1000));
        assert_eq!(m.until(0, Some(1)), 0, "nobody missing");
        m.forgot("a".into(), 100);
        assert_eq!(m.until(150, Some(1)), 1100);
        assert!(m.heard("a"));
        assert_eq!(m.until(160, Some(1)), 0, "heard again");
        m.forgot("a".into(), 200);
        assert_eq!(m.until(1199, Some(1)), 1200);
        assert_eq!(m.until(1201, Some(1)), 0, "given up on after the grace");
        assert!(!m.heard("a"));
    }

    #[test]
    fn our_own_outage_does_not_use_up_a_missing_peers_grace() {
        let mut m = Missing::new(Duration::from_millis(1000));
        m.forgot("a".into(), 100);
        // Disconnected for five seconds: nobody is given up on meanwhile.
        assert_eq!(m.len(), 1);
        m.until(5000, None);
        assert_eq!(m.len(), 1);
        // Back at 5000: the grace runs from then.
        assert_eq!(m.until(5100, Some(5000)), 6000);
        assert_eq!(m.until(6001, Some(5000)), 0);
    }
}
