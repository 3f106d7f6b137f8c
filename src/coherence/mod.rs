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
}

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
            client,
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
        }))
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
