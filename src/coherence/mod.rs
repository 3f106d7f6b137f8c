//! Coherence across instances: every acknowledged write is broadcast as an
//! invalidation over NATS, and every instance drops what peers invalidate.
//!
//! Promises and how they are kept:
//! - **Bounded staleness while the bus is healthy**: a write's keys are
//!   published when Redis acknowledges it (batched for at most
//!   `batch_delay`), and applied by peers on receipt.
//! - **A lost message never means a stale value for a whole TTL**: every
//!   instance numbers its messages; a peer that sees a gap flushes its L1. On
//!   reconnecting, an instance sends a resync carrying its sequence number, so
//!   messages lost while it was cut off show up as a gap at every peer.
//! - **A bus that is down or slow costs peers a flush, not this process
//!   unbounded memory**: while NATS is unreachable, or when more than
//!   `max_queued_keys` keys wait for the publisher, a write's invalidation is
//!   dropped, and the next message sent while connected skips a sequence
//!   number, so every peer sees a gap (at the latest with the resync) and
//!   flushes.
//! - **Bus loss is visible**: while NATS is unreachable, L1 is not served
//!   (`bypass`) or served for at most `max_staleness` (`serve-stale`); when the
//!   bus returns, L1 is flushed before it is served again.
//! - **A clean shutdown costs peers nothing**: the instance publishes what
//!   it has queued, then a leave message; peers forget it instead of
//!   flushing when its heartbeats stop.
//! - A message from a build that speaks another format version cannot be
//!   applied, so it flushes L1 rather than being ignored.

mod ack;
pub mod message;
pub mod tracking;

pub use ack::Ack;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::cache::{Invalidation, L1};
use crate::config::{CoherenceConfig, LossPolicy};
pub use crate::stats::BusStats;

mod publisher;
mod receiver;

use publisher::{Outgoing, Publisher, Queue, owned_keys, publish};
use receiver::{Missing, Receiver, receive};

/// The longest the NATS client waits between reconnect attempts. Once NATS
/// is back, every instance is connected again within about this long, which
/// bounds how long a peer still cut off can go unheard without being dead.
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(1);

/// Answers peers' requests for this instance's hot keys (not its own: a
/// request reaches every subscriber, the asker too).
async fn answer_hot_keys(
    client: async_nats::Client,
    mut asked: async_nats::Subscriber,
    me: String,
    hot: Arc<crate::stats::Stats>,
) {
    use futures_util::StreamExt as _;
    while let Some(msg) = asked.next().await {
        let Some(reply) = msg.reply else { continue };
        if msg.payload[..] == *me.as_bytes() {
            continue;
        }
        let payload = encode_hot_keys(&hot.hot_keys.top(PEER_HOT_KEYS));
        let _ = client.publish(reply, payload).await;
    }
}

/// Hot keys as `db (u32 LE), length (u32 LE), key` records.
fn encode_hot_keys(keys: &[crate::stats::HotKey]) -> Bytes {
    let mut out = Vec::new();
    for k in keys {
        out.extend_from_slice(&k.db.to_le_bytes());
        out.extend_from_slice(&u32::try_from(k.key.len()).unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&k.key);
    }
    out.into()
}

/// The records of [`encode_hot_keys`]; stops at the first malformed one.
fn decode_hot_keys(mut b: &[u8]) -> Vec<(u32, Bytes)> {
    let mut keys = Vec::new();
    while b.len() >= 8 {
        let db = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
        let Some(key) = b.get(8..8 + len) else { break };
        keys.push((db, Bytes::copy_from_slice(key)));
        b = &b[8 + len..];
    }
    keys
}

/// A running bus.
#[derive(Debug)]
pub struct Bus {
    queue: Queue,
    healthy: Arc<AtomicBool>,
    /// When the bus went down (ms since `start`), for `serve-stale`.
    down_at_ms: Arc<AtomicU64>,
    start: Instant,
    policy: LossPolicy,
    max_staleness: Duration,
    /// Send time (µs, Unix) of our own latest heartbeat that came back.
    last_echo_us: Arc<AtomicU64>,
    peer_timeout_us: u64,
    /// Until when (ms since `start`) L1 is not served while peers forgotten
    /// as silent may still be writing (0: no such peer; see `Missing`).
    bypass_until_ms: Arc<AtomicU64>,
    /// This instance's id on the bus.
    pub instance: String,
    /// For asking peers their hot keys.
    client: async_nats::Client,
    /// Where they answer.
    hot_subject: String,
}

/// How many hot keys a peer is asked for.
pub const PEER_HOT_KEYS: usize = 1000;

/// Why the bus could not start.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The NATS options are unusable (e.g. an unreadable .creds file).
    #[error("coherence: {0}")]
    Options(String),
    /// The client could not be created.
    #[error("coherence: connect to {url}: {reason}")]
    Connect {
        /// The NATS URL.
        url: String,
        /// Why.
        reason: String,
    },
}

impl Bus {
    /// Connects to NATS (in the background: the proxy serves, bypassing L1,
    /// until the bus is up), subscribes, and starts publishing.
    pub async fn start(
        cfg: &CoherenceConfig,
        l1: Arc<L1>,
        stats: Arc<BusStats>,
        hot: Arc<crate::stats::Stats>,
    ) -> Result<Arc<Bus>, BusError> {
        let name = if cfg.instance_id.is_empty() {
            let host =
                std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "nearcache".into());
            format!("{}-{}", host.trim(), std::process::id())
        } else {
            cfg.instance_id.clone()
        };
        let instance = wire_id(&name);
        let healthy = Arc::new(AtomicBool::new(false));
        let down_at_ms = Arc::new(AtomicU64::new(0));
        let connected_at_ms = Arc::new(AtomicU64::new(0));
        let bypass_until_ms = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let (tx, rx) = mpsc::unbounded_channel();
        let lost = Arc::new(AtomicBool::new(false));

        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("nearcache {instance}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(50 * attempts as u64).min(RECONNECT_DELAY_MAX)
            });
        // Credentials in the URL count as the fields would (async-nats
        // takes them only as options); the fields win when both are set.
        let (nats_url, in_url) = crate::config::split_credentials(&cfg.nats_url);
        match in_url {
            _ if !cfg.user.is_empty() => {
                opts = opts.user_and_password(cfg.user.clone(), cfg.password.clone());
            }
            Some((user, Some(password))) => opts = opts.user_and_password(user, password),
            Some((token, None)) if cfg.token.is_empty() => opts = opts.token(token),
            _ => {}
        }
        if !cfg.token.is_empty() {
            opts = opts.token(cfg.token.clone());
        }
        if !cfg.creds_file.is_empty() {
            opts = opts
                .credentials_file(&cfg.creds_file)
                .await
                .map_err(|e| BusError::Options(format!("creds_file {}: {e}", cfg.creds_file)))?;
        }
        if cfg.tls_required {
            opts = opts.require_tls(true);
        }
        if !cfg.tls_ca_file.is_empty() {
            opts = opts.add_root_certificates(cfg.tls_ca_file.clone().into());
        }
        if !cfg.tls_cert_file.is_empty() {
            opts = opts.add_client_certificate(
                cfg.tls_cert_file.clone().into(),
                cfg.tls_key_file.clone().into(),
            );
        }
        let events = EventHandler {
            healthy: healthy.clone(),
            down_at_ms: down_at_ms.clone(),
            connected_at_ms: connected_at_ms.clone(),
            start,
            l1: l1.clone(),
            stats: stats.clone(),
            resync: tx.clone(),
        };
        opts = opts.event_callback(move |event| {
            let events = events.clone();
            async move { events.on(event) }
        });
        let client = opts
            .connect(&nats_url)
            .await
            .map_err(|e| BusError::Connect {
                url: crate::config::redact_url(&cfg.nats_url).into_owned(),
                reason: e.to_string(),
            })?;
        let subject = cfg.subject();
        let subscriber =
            client
                .subscribe(subject.clone())
                .await
                .map_err(|e| BusError::Connect {
                    url: crate::config::redact_url(&cfg.nats_url).into_owned(),
                    reason: format!("subscribe to {subject}: {e}"),
                })?;
        let hot_subject = format!("{subject}.hotkeys");
        let asked = client
            .subscribe(hot_subject.clone())
            .await
            .map_err(|e| BusError::Connect {
                url: crate::config::redact_url(&cfg.nats_url).into_owned(),
                reason: format!("subscribe to {hot_subject}: {e}"),
            })?;
        tokio::spawn(answer_hot_keys(
            client.clone(),
            asked,
            instance.clone(),
            hot,
        ));
        let last_echo_us = Arc::new(AtomicU64::new(0));
        tokio::spawn(receive(
            subscriber,
            Receiver {
                me: instance.clone(),
                l1,
                stats: stats.clone(),
                last_echo_us: last_echo_us.clone(),
                peer_timeout: cfg.peer_timeout.0,
                missing: Missing::new(RECONNECT_DELAY_MAX + cfg.peer_timeout.0),
                healthy: healthy.clone(),
                start,
                connected_at_ms,
                bypass_until_ms: bypass_until_ms.clone(),
            },
        ));
        tokio::spawn(publish(
            client.clone(),
            subject,
            rx,
            Publisher {
                instance: instance.clone(),
                seq: AtomicU64::new(0),
                lost: lost.clone(),
                healthy: healthy.clone(),
                stats: stats.clone(),
                delay: cfg.batch_delay.0,
                max_keys: cfg.batch_max_keys,
                heartbeat: cfg.heartbeat_interval.0,
            },
        ));
        tracing::info!(%instance, url = %crate::config::redact_url(&cfg.nats_url), "coherence bus starting");
        Ok(Arc::new(Bus {
            queue: Queue {
                tx,
                lost,
                stats: stats.clone(),
                max: cfg.max_queued_keys,
            },
            healthy,
            down_at_ms,
            start,
            policy: cfg.loss_policy,
            max_staleness: cfg.max_staleness.0,
            last_echo_us,
            peer_timeout_us: cfg.peer_timeout.0.as_micros() as u64,
            bypass_until_ms,
            instance,
            client,
            hot_subject,
        }))
    }

    /// The hot keys of one live peer (the first to answer within a second),
    /// most read first, as (database, key); empty when no peer answers.
    pub async fn peer_hot_keys(&self) -> Vec<(u32, Bytes)> {
        let ask = self
            .client
            .request(self.hot_subject.clone(), Bytes::from(self.instance.clone()));
        match tokio::time::timeout(Duration::from_secs(1), ask).await {
            Ok(Ok(reply)) => decode_hot_keys(&reply.payload),
            _ => Vec::new(),
        }
    }

    /// Whether L1 may be served now, under the bus-loss policy.
    #[inline]
    pub fn l1_usable(&self) -> bool {
        if self.healthy.load(SeqCst) {
            // Connected, but have we applied everything up to a moment ago?
            // Our own heartbeat comes back after every message published
            // before it, so a fresh echo means we are caught up (a paused or
            // lagging instance is not).
            let caught_up =
                now_us().saturating_sub(self.last_echo_us.load(SeqCst)) < self.peer_timeout_us;
            // And may a peer that fell silent still be writing, cut off from
            // NATS while we are not?
            let bypass_until = self.bypass_until_ms.load(SeqCst);
            return caught_up
                && (bypass_until == 0 || self.start.elapsed().as_millis() as u64 >= bypass_until);
        }
        match self.policy {
            LossPolicy::Bypass => false,
            LossPolicy::ServeStale => {
                let down_at = self.down_at_ms.load(SeqCst);
                // 0: never connected yet, so nothing cached is trustworthy.
                down_at != 0
                    && (self.start.elapsed().as_millis() as u64).saturating_sub(down_at)
                        < self.max_staleness.as_millis() as u64
            }
        }
    }

    /// True while connected to NATS.
    pub fn healthy(&self) -> bool {
        self.healthy.load(SeqCst)
    }

    /// Publishes a write's invalidation (called when Redis acknowledged it).
    pub fn publish(&self, inv: &Invalidation) {
        let now = now_us();
        let healthy = self.healthy();
        if inv.flush {
            self.queue.push(Outgoing::Flush(now), healthy);
        }
        if !inv.keys.is_empty() {
            self.queue
                .push(Outgoing::Keys(owned_keys(&inv.keys), now), healthy);
        }
    }

    /// Asks every peer to drop keys matching `pattern`.
    pub fn publish_pattern(&self, pattern: Bytes) {
        self.queue
            .push(Outgoing::Pattern(pattern, now_us()), self.healthy());
    }

    /// Asks every peer to flush its L1.
    pub fn publish_flush(&self) {
        self.queue.push(Outgoing::Flush(now_us()), self.healthy());
    }

    /// Says goodbye on a clean shutdown, once no more writes can come:
    /// publishes what is still queued, then a leave message, and waits (at
    /// most `within`) until NATS has them. Peers then forget this instance
    /// instead of flushing their L1 when its heartbeats stop, as they must
    /// for an instance that vanishes without a word.
    pub async fn leave(&self, within: Duration) {
        if !self.healthy() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        if self.queue.tx.send(Outgoing::Leave(tx)).is_ok()
            && tokio::time::timeout(within, rx).await.is_ok()
        {
            tracing::info!("left the coherence bus");
        }
    }
}

/// Reacts to the NATS connection's state.
#[derive(Clone)]
struct EventHandler {
    /// When the bus last connected (ms since the bus started).
    connected_at_ms: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    down_at_ms: Arc<AtomicU64>,
    start: Instant,
    l1: Arc<L1>,
    stats: Arc<BusStats>,
    resync: mpsc::UnboundedSender<Outgoing>,
}

impl EventHandler {
    fn on(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
                // Whatever peers sent while we were away is lost to us: start
                // clean, then tell peers our sequence so they see our gaps.
                self.l1.flush();
                self.stats.flushes.fetch_add(1, SeqCst);
                let now_ms = (self.start.elapsed().as_millis() as u64).max(1);
                self.connected_at_ms.store(now_ms, SeqCst);
                self.healthy.store(true, SeqCst);
                let _ = self.resync.send(Outgoing::Resync);
                match self.down_at_ms.load(SeqCst) {
                    0 => tracing::info!("coherence bus connected; L1 flushed"),
                    down => tracing::info!(
                        after = ?std::time::Duration::from_millis(now_ms.saturating_sub(down)),
                        "coherence bus back; L1 flushed"
                    ),
                }
            }
            async_nats::Event::Disconnected => {
                self.healthy.store(false, SeqCst);
                self.down_at_ms
                    .store((self.start.elapsed().as_millis() as u64).max(1), SeqCst);
                tracing::warn!("coherence bus disconnected; L1 follows the loss policy");
            }
            other => tracing::debug!(event = %other, "coherence bus event"),
        }
    }
}

/// The id an instance goes by on the bus: its configured (or default) name
/// and a random suffix drawn at start-up. Every process is then a peer of
/// its own, even when two share a name (one config file deployed
/// everywhere) or a process restarts under its old name: without the suffix,
/// namesakes would take each other's messages for their own echo and ignore
/// them, and a peer that crashed and came straight back would not show the
/// gap where its last, unsent invalidations were.
fn wire_id(name: &str) -> String {
    use std::hash::BuildHasher;
    // std's RandomState is seeded from the operating system's randomness.
    let nonce = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    format!("{name}~{:08x}", nonce as u32)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod hot_key_tests {
    use super::*;

    #[test]
    fn hot_key_lists_round_trip_and_stop_at_a_torn_record() {
        let keys = [(0, &b"ticker:BTC"[..]), (3, b""), (1, b"k\0\xff")];
        let list: Vec<crate::stats::HotKey> = keys
            .iter()
            .map(|&(db, key)| crate::stats::HotKey {
                db,
                key: key.to_vec(),
                count: 1,
                error: 0,
            })
            .collect();
        let wire = encode_hot_keys(&list);
        let back = decode_hot_keys(&wire);
        assert_eq!(back.len(), 3);
        assert!(
            back.iter()
                .zip(keys)
                .all(|((db, k), (d, key))| *db == d && &k[..] == key)
        );
        assert_eq!(decode_hot_keys(&wire[..wire.len() - 1]).len(), 2);
    }
}
