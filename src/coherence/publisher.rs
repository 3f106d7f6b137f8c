//! The publishing side of the bus: the sessions' bounded queue, batching,
//! sequence numbers and the messages sent to NATS.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use super::message::{Kind, Message};
use super::{BusStats, now_us};
use crate::cache::ANY_DB;

/// What sessions send to the publisher; invalidations carry the time (µs,
/// Unix) they were queued, which becomes the message's `sent_at_us`.
#[derive(Debug)]
pub(super) enum Outgoing {
    Keys(Vec<(u32, Bytes)>, u64),
    Flush(u64),
    Pattern(Bytes, u64),
    /// After a reconnect: our sequence number, so peers see what we lost.
    Resync,
    /// Shutting down: tell peers, after everything queued before, and
    /// report on the sender once NATS has it.
    Leave(oneshot::Sender<()>),
}

/// The keys, copied into one buffer of their own. The originals are slices
/// of the client's input buffer, and a queued slice keeps that whole buffer
/// alive: with a slow NATS, `max_queued_keys` keys could otherwise pin as
/// many pipelines of megabyte values.
pub(super) fn owned_keys(keys: &[(u32, Bytes)]) -> Vec<(u32, Bytes)> {
    let mut buf = BytesMut::with_capacity(keys.iter().map(|(_, k)| k.len()).sum());
    for (_, key) in keys {
        buf.extend_from_slice(key);
    }
    let mut buf = buf.freeze();
    keys.iter()
        .map(|(db, key)| (*db, buf.split_to(key.len())))
        .collect()
}

impl Outgoing {
    /// What it counts for against `max_queued_keys`.
    fn weight(&self) -> usize {
        match self {
            Outgoing::Keys(keys, _) => keys.len(),
            _ => 1,
        }
    }
}

/// The sessions' end of the publisher's queue. Bounded: while NATS is
/// unreachable, async-nats stops taking messages, and an unbounded queue
/// would grow with every write for as long as the outage lasts. What cannot
/// be queued is dropped and the publisher told to skip a sequence number,
/// so peers see a gap and flush — the promise is kept by the flush instead
/// of by the message. One skip covers every drop before it, and is taken
/// only while connected: the messages numbered during an outage (heartbeats)
/// reach peers in one burst on reconnect, and skips among them would flush
/// each peer once per heartbeat instead of once per outage.
#[derive(Debug)]
pub(super) struct Queue {
    pub(super) tx: mpsc::UnboundedSender<Outgoing>,
    /// Set when something was dropped; the publisher's next message skips
    /// a number.
    pub(super) lost: Arc<AtomicBool>,
    pub(super) stats: Arc<BusStats>,
    pub(super) max: usize,
}

impl Queue {
    /// Queues `item` if the bus is `healthy` and there is room, else drops
    /// it and marks the loss.
    pub(super) fn push(&self, item: Outgoing, healthy: bool) {
        let weight = item.weight();
        let queued = &self.stats.queued_keys;
        if healthy && queued.fetch_add(weight, SeqCst) < self.max {
            if self.tx.send(item).is_ok() {
                return;
            }
        } else if healthy {
            // Over the bound: take back what was just added.
            queued.fetch_sub(weight, SeqCst);
        }
        // (A failed send means the publisher is gone: there is nothing left
        // to publish to, and the count no longer matters.)
        self.lost.store(true, SeqCst);
        self.stats.dropped_keys.fetch_add(weight as u64, SeqCst);
    }
}

pub(super) struct Publisher {
    pub(super) instance: String,
    pub(super) seq: AtomicU64,
    /// `Queue::lost`: taken, while `healthy`, by skipping a number.
    pub(super) lost: Arc<AtomicBool>,
    pub(super) healthy: Arc<AtomicBool>,
    pub(super) stats: Arc<BusStats>,
    pub(super) delay: Duration,
    pub(super) max_keys: usize,
    pub(super) heartbeat: Duration,
}

impl Publisher {
    fn message(&self, kind: Kind, entries: Vec<(u32, Bytes)>, sent_at_us: u64) -> Bytes {
        Message {
            kind,
            instance: self.instance.clone(),
            seq: {
                let skip = self.healthy.load(SeqCst) && self.lost.swap(false, SeqCst);
                let step = 1 + u64::from(skip);
                self.seq.fetch_add(step, SeqCst) + step
            },
            sent_at_us,
            entries,
        }
        .encode()
    }

    /// Numbers and encodes `keys` as as many messages as it takes to keep
    /// each within `max_keys` keys and `max_payload` bytes (what the NATS
    /// server accepts: a bigger message would be refused, a gap every peer
    /// answers with a flush). A key too big for any message becomes a flush.
    fn keys_messages(
        &self,
        keys: Vec<(u32, Bytes)>,
        sent_at_us: u64,
        max_payload: usize,
        out: &mut Vec<Bytes>,
    ) {
        let room = max_payload.saturating_sub(Message::overhead(&self.instance));
        // Keys in one database and keys in every database (a script's) go
        // in messages of their own kinds; the order between them does not
        // matter, as each only drops keys.
        let mut batches = [
            (Kind::Keys, Vec::new(), 0),
            (Kind::AnyDbKeys, Vec::new(), 0),
        ];
        for (db, key) in keys {
            let (kind, batch, bytes) = &mut batches[usize::from(db == ANY_DB)];
            let size = Message::entry_size(&key);
            if size > room {
                tracing::warn!(
                    len = key.len(),
                    max_payload,
                    "a key too long for one NATS message; peers flush L1 instead"
                );
                self.flush_keys(*kind, batch, sent_at_us, out);
                out.push(self.message(Kind::Flush, Vec::new(), sent_at_us));
                *bytes = 0;
                continue;
            }
            if batch.len() == self.max_keys || *bytes + size > room {
                self.flush_keys(*kind, batch, sent_at_us, out);
                *bytes = 0;
            }
            *bytes += size;
            batch.push((db, key));
        }
        for (kind, batch, _) in &mut batches {
            self.flush_keys(*kind, batch, sent_at_us, out);
        }
    }

    /// Encodes `batch` (if not empty) as one message of `kind`, leaving it
    /// empty.
    fn flush_keys(
        &self,
        kind: Kind,
        batch: &mut Vec<(u32, Bytes)>,
        sent_at_us: u64,
        out: &mut Vec<Bytes>,
    ) {
        if batch.is_empty() {
            return;
        }
        self.stats
            .published_keys
            .fetch_add(batch.len() as u64, SeqCst);
        out.push(self.message(kind, std::mem::take(batch), sent_at_us));
    }
}

/// What the NATS server accepts in one message, or NATS's default (1 MiB)
/// before the server has said.
fn max_payload(client: &async_nats::Client) -> usize {
    match client.server_info().max_payload {
        0 => 1 << 20,
        n => n,
    }
}

/// Batches invalidations and publishes them. With `delay` zero, a message
/// carries whatever was queued by the time the publisher runs again after
/// yielding once (batches grow with the write rate, and a lone write waits
/// microseconds); otherwise invalidations wait up to `delay` for company.
/// Either way at most `max_keys` keys share a message.
pub(super) async fn publish(
    client: async_nats::Client,
    subject: String,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    p: Publisher,
) {
    let mut beat = tokio::time::interval(p.heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // When the last invalidation message left: the next may leave at once
    // if that was at least `delay` ago, else when it will have been.
    let mut last_keys_sent: Option<tokio::time::Instant> = None;
    loop {
        let first = tokio::select! {
            item = rx.recv() => match item {
                Some(item) => item,
                None => return,
            },
            // The heartbeat: a resync, so it also carries our sequence.
            _ = beat.tick() => Outgoing::Resync,
        };
        let mut keys = Vec::new();
        // When the oldest of `keys` was queued.
        let mut keys_at = u64::MAX;
        let mut out: Vec<Bytes> = Vec::new();
        let mut leaving = None;
        // What NATS takes in one message (server_info() clones, so once).
        let limit = max_payload(&client);
        let mut take = |item: Outgoing, keys: &mut Vec<(u32, Bytes)>, out: &mut Vec<Bytes>| {
            if !matches!(item, Outgoing::Resync | Outgoing::Leave(_)) {
                p.stats.queued_keys.fetch_sub(item.weight(), SeqCst);
            }
            if let Outgoing::Keys(k, at) = item {
                keys.extend(k);
                keys_at = keys_at.min(at);
                return;
            }
            // Keys queued before this message are numbered and sent before
            // it: peers must see sequence numbers in order, or they flush.
            if !keys.is_empty() {
                p.keys_messages(std::mem::take(keys), keys_at, limit, out);
                keys_at = u64::MAX;
            }
            out.push(match item {
                Outgoing::Flush(at) => p.message(Kind::Flush, Vec::new(), at),
                // A glob too long for one message: dropping everything
                // covers it.
                Outgoing::Pattern(pat, at)
                    if Message::overhead(&p.instance) + Message::entry_size(&pat) > limit =>
                {
                    p.message(Kind::Flush, Vec::new(), at)
                }
                Outgoing::Pattern(pat, at) => p.message(Kind::Pattern, vec![(u32::MAX, pat)], at),
                Outgoing::Leave(done) => {
                    leaving = Some(done);
                    p.message(Kind::Leave, Vec::new(), now_us())
                }
                // Resync (keys returned above).
                _ => p.message(Kind::Resync, Vec::new(), now_us()),
            });
        };
        take(first, &mut keys, &mut out);
        // `delay` limits the rate of messages, not the wait of the first
        // invalidation after a quiet spell: that one leaves at once (after a
        // yield, so that writes acknowledged together share it), and only
        // invalidations within `delay` of the previous message wait for the
        // next — at most `delay`. Tokio's timer fires on whole-millisecond
        // ticks, rounding up: aim one tick early so the wait is at most
        // `delay`, not up to a millisecond more.
        let deadline = batch_deadline(last_keys_sent, tokio::time::Instant::now(), p.delay);
        if deadline.is_none() {
            tokio::task::yield_now().await;
        }
        while keys.len() < p.max_keys && out.is_empty() {
            let item = match deadline {
                None => rx.try_recv().ok(),
                Some(at) => tokio::time::timeout_at(at, rx.recv()).await.ok().flatten(),
            };
            let Some(item) = item else { break };
            take(item, &mut keys, &mut out);
        }
        // (Keys that left early, ahead of a flush or pattern, are rare
        // enough not to count against the rate.)
        if !keys.is_empty() {
            p.keys_messages(keys, keys_at, limit, &mut out);
            last_keys_sent = Some(tokio::time::Instant::now());
        }
        for payload in out {
            match client.publish(subject.clone(), payload).await {
                Ok(()) => {
                    p.stats.published.fetch_add(1, SeqCst);
                }
                Err(e) => {
                    // Its sequence number is spent: peers see the gap (at the
                    // latest with our resync after reconnecting) and flush.
                    p.stats.publish_errors.fetch_add(1, SeqCst);
                    tracing::warn!(error = %e, "publishing an invalidation failed");
                }
            }
        }
        if let Some(done) = leaving {
            // Nothing may follow a leave: peers no longer track us.
            if client.flush().await.is_ok() {
                let _ = done.send(());
            }
            return;
        }
    }
}

/// When a batch whose first invalidation arrived `now` leaves: `None` at
/// once (after one yield), else at the returned instant — `delay` after the
/// previous invalidation message, aimed one timer tick (1 ms) early because
/// tokio rounds timers up to the next tick, so the wait stays within `delay`.
fn batch_deadline(
    last_keys_sent: Option<tokio::time::Instant>,
    now: tokio::time::Instant,
    delay: Duration,
) -> Option<tokio::time::Instant> {
    let due = last_keys_sent? + delay;
    (due > now).then(|| due - Duration::from_millis(1).min(due - now) + Duration::from_micros(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    const MS: Duration = Duration::from_millis(1);

    fn publisher(max_keys: usize) -> Publisher {
        Publisher {
            instance: "me".into(),
            seq: AtomicU64::new(0),
            lost: Arc::new(AtomicBool::new(false)),
            healthy: Arc::new(AtomicBool::new(true)),
            stats: Arc::new(BusStats::default()),
            delay: MS,
            max_keys,
            heartbeat: Duration::from_secs(1),
        }
    }

    fn key(n: usize) -> (u32, Bytes) {
        (0, Bytes::from(vec![b'k'; n]))
    }

    fn decoded(out: Vec<Bytes>) -> Vec<Message> {
        out.into_iter()
            .map(|m| Message::decode(m).expect("the publisher writes readable messages"))
            .collect()
    }

    fn keys(n: usize) -> Outgoing {
        Outgoing::Keys((0..n).map(|_| key(1)).collect(), 0)
    }

    #[test]
    fn the_queue_is_bounded_and_what_it_drops_costs_one_sequence_number() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let p = publisher(100);
        let q = Queue {
            tx,
            lost: p.lost.clone(),
            stats: Arc::new(BusStats::default()),
            max: 10,
        };
        let seq = |kind| Message::decode(p.message(kind, Vec::new(), 0)).map(|m| m.seq);
        assert_eq!(seq(Kind::Resync), Ok(1));
        q.push(keys(6), true);
        q.push(keys(6), true); // below the bound when it came: taken
        assert_eq!(q.stats.queued_keys.load(SeqCst), 12);
        q.push(keys(1), true); // at or over the bound: dropped
        q.push(Outgoing::Flush(0), true);
        assert_eq!(
            q.stats.queued_keys.load(SeqCst),
            12,
            "dropped items are not counted"
        );
        assert_eq!(q.stats.dropped_keys.load(SeqCst), 2);
        // Two drops, one gap peers will see: the next message skips one.
        assert_eq!(seq(Kind::Resync), Ok(3));
        assert_eq!(seq(Kind::Resync), Ok(4), "no loss since: no skip");
        assert!(matches!(rx.try_recv(), Ok(Outgoing::Keys(k, _)) if k.len() == 6));
        assert!(matches!(rx.try_recv(), Ok(Outgoing::Keys(k, _)) if k.len() == 6));
        assert!(rx.try_recv().is_err(), "nothing past the bound was queued");

        // The bus down: nothing is queued however empty the queue is, and
        // messages numbered meanwhile (they go out in one burst on
        // reconnect) skip nothing; the first once connected again does.
        p.healthy.store(false, SeqCst);
        q.stats.queued_keys.store(0, SeqCst);
        q.push(keys(3), false);
        assert_eq!(seq(Kind::Resync), Ok(5));
        q.push(Outgoing::Pattern(Bytes::from_static(b"t:*"), 0), false);
        assert_eq!(seq(Kind::Resync), Ok(6));
        assert!(rx.try_recv().is_err());
        assert_eq!(q.stats.queued_keys.load(SeqCst), 0);
        assert_eq!(q.stats.dropped_keys.load(SeqCst), 6);
        p.healthy.store(true, SeqCst);
        assert_eq!(seq(Kind::Resync), Ok(8));
        assert_eq!(seq(Kind::Resync), Ok(9));
    }

    #[test]
    fn queued_keys_do_not_keep_the_client_input_alive() {
        let input = Bytes::from(vec![b'x'; 1 << 20]);
        let keys = vec![(0, input.slice(10..13)), (3, input.slice(100..102))];
        let owned = owned_keys(&keys);
        assert_eq!(owned, keys);
        let within = |b: &Bytes| input.as_ptr_range().contains(&b.as_ptr());
        assert!(owned.iter().all(|(_, k)| !within(k)), "a copy, not a slice");
    }

    #[test]
    fn keys_split_by_count_and_size_in_sequence() {
        let p = publisher(3);
        let room = Message::overhead("me") + 2 * Message::entry_size(&[0; 10]);
        let mut out = Vec::new();
        // Three 1-byte keys fill a message by count; two 10-byte keys fill
        // one by size; the last key is alone.
        let keys = vec![key(1), key(1), key(1), key(10), key(10), key(10)];
        p.keys_messages(keys.clone(), 5, room, &mut out);
        let got = decoded(out);
        let sizes: Vec<usize> = got.iter().map(|m| m.entries.len()).collect();
        assert_eq!(sizes, [3, 2, 1]);
        assert!(
            got.iter()
                .all(|m| m.kind == Kind::Keys && m.sent_at_us == 5)
        );
        assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3]);
        let all: Vec<(u32, Bytes)> = got.into_iter().flat_map(|m| m.entries).collect();
        assert_eq!(all, keys, "every key, in order");
        assert_eq!(p.stats.published_keys.load(SeqCst), 6);
    }

    #[test]
    fn keys_in_every_database_travel_in_messages_of_their_own_kind() {
        let p = publisher(2);
        let any = |k: &'static [u8]| (ANY_DB, Bytes::from_static(k));
        let one = |k: &'static [u8]| (4, Bytes::from_static(k));
        let mut out = Vec::new();
        let keys = vec![one(b"a"), any(b"s1"), one(b"b"), any(b"s2"), any(b"s3")];
        p.keys_messages(keys, 5, 1 << 20, &mut out);
        let got: Vec<(Kind, Vec<(u32, Bytes)>)> = decoded(out)
            .into_iter()
            .map(|m| (m.kind, m.entries))
            .collect();
        assert_eq!(
            got,
            [
                (Kind::AnyDbKeys, vec![any(b"s1"), any(b"s2")]),
                (Kind::Keys, vec![one(b"a"), one(b"b")]),
                (Kind::AnyDbKeys, vec![any(b"s3")]),
            ]
        );
    }

    #[test]
    fn a_key_too_big_for_any_message_becomes_a_flush() {
        let p = publisher(100);
        let room = Message::overhead("me") + Message::entry_size(&[0; 10]);
        let mut out = Vec::new();
        p.keys_messages(vec![key(1), key(11), key(2)], 5, room, &mut out);
        let kinds: Vec<(Kind, usize)> = decoded(out)
            .iter()
            .map(|m| (m.kind, m.entries.len()))
            .collect();
        assert_eq!(kinds, [(Kind::Keys, 1), (Kind::Flush, 0), (Kind::Keys, 1)]);
    }

    #[test]
    fn a_batch_after_a_quiet_spell_leaves_at_once() {
        let now = Instant::now();
        assert_eq!(batch_deadline(None, now, MS), None, "first message ever");
        assert_eq!(
            batch_deadline(Some(now - MS), now, MS),
            None,
            "exactly delay ago"
        );
        assert_eq!(batch_deadline(Some(now - 5 * MS), now, MS), None);
        assert_eq!(
            batch_deadline(Some(now), now, Duration::ZERO),
            None,
            "no delay"
        );
    }

    #[test]
    fn a_batch_soon_after_the_last_waits_at_most_the_delay() {
        let now = Instant::now();
        let us = Duration::from_micros(1);
        // 0.3 ms after a message, with 1 ms: the next timer tick (≤ 1 ms).
        let last = now - Duration::from_micros(300);
        assert_eq!(batch_deadline(Some(last), now, MS), Some(now + us));
        // 2 ms after, with 10 ms: 8 ms to go, aimed a tick early.
        let last = now - 2 * MS;
        assert_eq!(
            batch_deadline(Some(last), now, 10 * MS),
            Some(last + 10 * MS - MS + us)
        );
    }
}
