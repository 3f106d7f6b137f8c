//! Counters of the coherence bus and of Redis tracking, read by `PROXY STATS`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::time::Instant;

use super::Histogram;

/// Bus counters, read by `PROXY STATS`.
#[derive(Debug, Default)]
pub struct BusStats {
    /// Messages published.
    pub published: AtomicU64,
    /// Keys published.
    pub published_keys: AtomicU64,
    /// Messages received from peers (own messages excluded).
    pub received: AtomicU64,
    /// Keys dropped because peers wrote them.
    pub applied_keys: AtomicU64,
    /// L1 flushes caused by the bus (gaps, reconnects, unreadable messages,
    /// peers' flushes).
    pub flushes: AtomicU64,
    /// Sequence gaps seen.
    pub gaps: AtomicU64,
    /// Publish failures (the message is covered by the resync gap).
    pub publish_errors: AtomicU64,
    /// Keys (and flush or pattern requests) not published because the bus
    /// was down or its queue full; peers flush instead.
    pub dropped_keys: AtomicU64,
    /// Keys (and flush or pattern requests) waiting for the publisher now.
    pub queued_keys: AtomicUsize,
    /// Delay of peers' invalidations, µs: from the moment the writing
    /// instance had the write acknowledged (the oldest in the message) to the
    /// moment this instance applied it. Heartbeats are not counted.
    pub delay_us: Histogram,
    /// Peers heard from within `peer_timeout` (heartbeats or messages) and
    /// not gone: the other live instances, for fleet-scoped limits.
    pub live_peers: AtomicU64,
    /// Peers that fell silent past `peer_timeout` (each flushed L1).
    pub silent_peers: AtomicU64,
    /// Peers that said goodbye on a clean shutdown (no flush needed).
    pub peers_left: AtomicU64,
    /// Peers forgotten as silent that may still be writing, cut off from
    /// NATS: L1 is not served until each is heard again or its grace ends.
    pub awaiting_peers: AtomicU64,
    /// The peers heard and not gone, by instance id (`PROXY PEERS`);
    /// written by the bus's receiving task only, once per message.
    peers: Mutex<HashMap<String, PeerSeen>>,
}

/// What this instance last heard from a peer on the bus.
#[derive(Debug, Clone, Copy)]
pub struct PeerSeen {
    /// When its latest message arrived.
    pub heard: Instant,
    /// That message's delay, µs: from its sending to its arrival (clocks
    /// of two hosts, so only as good as their synchronisation).
    pub delay_us: u64,
    /// Messages heard from it (heartbeats included).
    pub messages: u64,
}

impl BusStats {
    /// A message from `peer` arrived `delay_us` after it was sent.
    pub fn peer_heard(&self, peer: &str, delay_us: u64) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match peers.get_mut(peer) {
            Some(p) => {
                p.heard = now;
                p.delay_us = delay_us;
                p.messages += 1;
            }
            None => {
                peers.insert(
                    peer.to_owned(),
                    PeerSeen {
                        heard: now,
                        delay_us,
                        messages: 1,
                    },
                );
            }
        }
    }

    /// `peer` left, or fell silent.
    pub fn peer_gone(&self, peer: &str) {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(peer);
    }

    /// The peers heard and not gone, by id.
    pub fn peers(&self) -> Vec<(String, PeerSeen)> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<_> = peers.iter().map(|(k, v)| (k.clone(), *v)).collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        list
    }
}

/// Redis tracking's state (`coherence.redis_tracking`).
#[derive(Debug, Default)]
pub struct TrackingStats {
    /// Tracking is enabled on a live connection.
    pub active: AtomicBool,
    /// Keys Redis reported written (each dropped from L1 in every database).
    pub keys: AtomicU64,
}
