//! Replies waiting to be written to one client, in command order.
//!
//! The session queues one [`Slot`] per reply (or per run of pipelined replies)
//! and writes from the same task that reads, so a request costs no hand-off
//! between tasks. [`Outbox::collect`] moves every slot that is already answered
//! into one buffer, so a pipeline whose replies arrive together leaves in one
//! `write`; [`Outbox::ready`] waits for the first one that is not.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

use crate::cache::Invalidation;
use crate::coherence::Ack;
use crate::error::ProxyError;
use crate::stats::{Stats, Timing};
use crate::upstream::connection::Failed;
use crate::upstream::{Replies, UpstreamError};

/// One reply, or a run of replies, in command order.
#[derive(Debug)]
pub enum Slot {
    /// Answered by the proxy (or already arrived).
    Ready(Bytes),
    /// `count` replies from upstream, arriving together.
    Upstream {
        /// Where they arrive.
        rx: oneshot::Receiver<Replies>,
        /// How many commands they answer (for error replies).
        count: u32,
        /// A blocking command: abandoned, not awaited, when the client leaves.
        blocking: bool,
        /// Values Redis stores compressed to decompress in the reply
        /// (`store_compressed`; a slot of one command).
        decode: Option<Box<crate::stored::Decode>>,
        /// Keys the commands wrote: dropped from L1 when the replies arrive,
        /// before the client can see them.
        inv: Invalidation,
        /// The path the replies take and when their commands were read, for
        /// their latency.
        timing: Timing,
    },
    /// Every frame from a relaying connection, until it ends.
    Relay(mpsc::Receiver<Bytes>),
    /// From here on, drop replies (`CLIENT REPLY OFF`, or the command after
    /// `SKIP`) or write them again. Muted replies still count as answers:
    /// their writes' keys are invalidated and published as usual.
    Mute(bool),
    /// Close the connection once everything before is written.
    Close,
}

/// The queue of slots and the bytes ready to be written.
#[derive(Debug)]
pub struct Outbox {
    ack: Ack,
    stats: Arc<Stats>,
    scratch: Vec<u8>,
    slots: VecDeque<Slot>,
    /// Replies the queued slots stand for (a run counts each of its commands).
    replies: usize,
    /// Replies are dropped, not written (as of the head of the queue).
    muted: bool,
    /// A command whose outcome is unknown closes the connection instead of
    /// being answered with an error (`upstream.on_lost = "close"`).
    close_on_lost: bool,
    /// Bytes ready for the next write.
    pub buf: BytesMut,
}

impl Outbox {
    /// An empty outbox, whose answered slots' writes go to `ack` and whose
    /// replies are timed into `stats`.
    pub fn new(ack: Ack, stats: Arc<Stats>) -> Self {
        Self {
            ack,
            stats,
            scratch: Vec::new(),
            replies: 0,
            muted: false,
            close_on_lost: false,
            slots: VecDeque::with_capacity(16),
            buf: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// The same, closing the connection at a command whose outcome is
    /// unknown (the upstream connection lost, or timed out, with it in
    /// flight) when `on` (`upstream.on_lost = "close"`).
    #[must_use]
    pub fn closing_on_lost(mut self, on: bool) -> Self {
        self.close_on_lost = on;
        self
    }

    /// Queues a slot after every other.
    #[inline]
    pub fn push(&mut self, slot: Slot) {
        if let (Slot::Mute(on), true) = (&slot, self.slots.is_empty()) {
            self.muted = *on;
            return;
        }
        self.replies += weight(&slot);
        self.slots.push_back(slot);
    }

    /// Queues a reply the proxy produced: straight into the write buffer
    /// when nothing waits ahead of it (no slot, no allocation).
    #[inline]
    pub fn put(&mut self, reply: &[u8]) {
        if self.slots.is_empty() {
            if !self.muted {
                self.buf.extend_from_slice(reply);
            }
        } else {
            self.push(Slot::Ready(Bytes::copy_from_slice(reply)));
        }
    }

    /// Like [`Outbox::put`], for an L1 reply (which may be held compressed:
    /// decompressed straight into the write buffer). False if it could not
    /// be decompressed (nothing was queued).
    #[inline]
    pub fn put_held(&mut self, reply: crate::cache::Held<'_>) -> bool {
        if let Some(plain) = reply.as_plain() {
            self.put(plain);
            return true;
        }
        if !self.slots.is_empty() {
            let Some(bytes) = reply.to_bytes() else {
                return false;
            };
            self.push(Slot::Ready(bytes));
            return true;
        }
        self.muted || reply.append_to(&mut self.buf)
    }

    /// Like [`Outbox::put`], for a reply already in a buffer of its own.
    #[inline]
    pub fn put_bytes(&mut self, reply: Bytes) {
        if self.slots.is_empty() {
            if !self.muted {
                self.buf.extend_from_slice(&reply);
            }
        } else {
            self.push(Slot::Ready(reply));
        }
    }

    /// Appends to the write buffer unless muted.
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        if !self.muted {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Replies not yet written (the backpressure measure).
    #[inline]
    pub fn pending_replies(&self) -> usize {
        self.replies
    }

    fn pop(&mut self) {
        if let Some(slot) = self.slots.pop_front() {
            self.replies -= weight(&slot);
        }
    }

    /// True when every slot has been written.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// True while some reply from Redis is still to come (not counting
    /// relayed frames).
    pub fn awaits_upstream(&self) -> bool {
        self.slots
            .iter()
            .any(|s| matches!(s, Slot::Upstream { .. }))
    }

    /// Waits until every reply from Redis queued so far has arrived (they are
    /// written to the client later, in order, as usual).
    pub async fn settle_upstream(&mut self) {
        for slot in &mut self.slots {
            if let Slot::Upstream { rx, .. } = slot {
                let replies = (&mut *rx).await.unwrap_or_else(|_| Err(lost()));
                *rx = answered(replies);
            }
        }
    }

    /// Has the replies of the slot queued last, if it is a request to Redis,
    /// decompressed (`store_compressed`; see [`crate::stored`]).
    pub fn decode_last(&mut self, how: crate::stored::Decode) {
        if let Some(Slot::Upstream { decode, .. }) = self.slots.back_mut() {
            *decode = Some(Box::new(how));
        }
    }

    /// Waits for the replies of the slot queued last, if it is a request to
    /// Redis, leaving the slot in place for [`Outbox::answer_last`].
    pub async fn last_replies(&mut self) -> Option<Replies> {
        let Some(Slot::Upstream { rx, .. }) = self.slots.back_mut() else {
            return None;
        };
        Some((&mut *rx).await.unwrap_or_else(|_| Err(lost())))
    }

    /// Answers the slot queued last with `replies` (after
    /// [`Outbox::last_replies`] took its own).
    pub fn answer_last(&mut self, replies: Replies) {
        if let Some(Slot::Upstream { rx, .. }) = self.slots.back_mut() {
            *rx = answered(replies);
        }
    }

    /// True while some slot is a relay that has not ended.
    pub fn has_relay(&self) -> bool {
        self.slots.iter().any(|s| matches!(s, Slot::Relay(_)))
    }

    /// True while the head slot is a relay (the client is subscribed or
    /// monitoring), which exempts it from the idle timeout.
    pub fn relaying(&self) -> bool {
        matches!(self.slots.front(), Some(Slot::Relay(_)))
    }

    /// Drops what would never finish without the client: relays (a subscriber
    /// or MONITOR) and blocking commands. Their dedicated connections notice
    /// nobody is waiting and close, which is what Redis does for a client that
    /// disconnects: a blocked pop that nobody will read must not take an item.
    pub fn abandon_unbounded(&mut self) {
        let slots = std::mem::take(&mut self.slots);
        for slot in slots {
            match slot {
                Slot::Relay(_) | Slot::Upstream { blocking: true, .. } => self.orphan(slot),
                slot => self.slots.push_back(slot),
            }
        }
        self.replies = self.slots.iter().map(weight).sum();
    }

    /// Lets go of a slot nobody will read, keeping its writes' promise: their
    /// keys are still dropped from L1 and published once Redis has answered
    /// (or failed to), as the writes may run. A blocked command is being
    /// abandoned (its connection closes), so it is not waited for.
    fn orphan(&self, slot: Slot) {
        let Slot::Upstream {
            rx, blocking, inv, ..
        } = slot
        else {
            return;
        };
        if inv.is_empty() {
            return;
        }
        let ack = self.ack.clone();
        let publish = move |inv: Invalidation| ack.acknowledged(&inv, &mut Vec::new());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if !blocking => {
                runtime.spawn(async move {
                    let _ = rx.await;
                    publish(inv);
                });
            }
            _ => publish(inv),
        }
    }

    /// Drops relays only (shutdown: a subscriber never finishes on its own,
    /// while a blocked command is in flight and may finish within the deadline).
    pub fn end_relays(&mut self) {
        self.slots.retain(|s| !matches!(s, Slot::Relay(_)));
    }

    /// Moves every slot that can be written now into `buf`, stopping at the
    /// first that is still waiting. Returns true when a `Close` slot is reached.
    pub fn collect(&mut self) -> bool {
        while let Some(head) = self.slots.front_mut() {
            match head {
                Slot::Ready(bytes) => {
                    if !self.muted {
                        self.buf.extend_from_slice(bytes);
                    }
                    self.pop();
                }
                Slot::Mute(on) => {
                    self.muted = *on;
                    self.pop();
                }
                Slot::Upstream { rx, .. } => {
                    let replies = match rx.try_recv() {
                        Ok(r) => r,
                        Err(oneshot::error::TryRecvError::Empty) => return false,
                        Err(oneshot::error::TryRecvError::Closed) => Err(lost()),
                    };
                    self.answered(replies);
                }
                Slot::Relay(rx) => match rx.try_recv() {
                    Ok(frame) => self.write(&frame),
                    Err(TryRecvError::Empty) => return false,
                    Err(TryRecvError::Disconnected) => {
                        self.pop();
                    }
                },
                Slot::Close => return true,
            }
        }
        false
    }

    /// Waits until the head slot has something to write (never resolves when
    /// empty). Cancel-safe: whatever arrived is kept in the queue.
    pub async fn ready(&mut self) {
        match self.slots.front_mut() {
            None => std::future::pending().await,
            Some(Slot::Ready(_) | Slot::Mute(_) | Slot::Close) => {}
            Some(Slot::Upstream { rx, .. }) => {
                let replies = rx.await.unwrap_or_else(|_| Err(lost()));
                self.answered(replies);
            }
            Some(Slot::Relay(rx)) => match rx.recv().await {
                Some(frame) => self.write(&frame),
                None => {
                    self.pop();
                }
            },
        }
    }

    /// The head slot is answered: drop what its writes touched from L1, then
    /// take its replies.
    fn answered(&mut self, replies: Replies) {
        let Some(Slot::Upstream {
            count,
            inv,
            timing,
            decode,
            ..
        }) = self.slots.front()
        else {
            return;
        };
        let count = *count;
        let replies = match decode {
            Some(how) => crate::stored::decode_replies(replies, how),
            None => replies,
        };
        let us = self.stats.requests.replied(*timing, u64::from(count));
        self.stats.slowlog.note(timing, count, us);
        self.ack.acknowledged(inv, &mut self.scratch);
        self.pop();
        self.append(replies, count);
    }

    /// Appends a run's replies; a failure still yields one reply per command.
    fn append(&mut self, replies: Replies, count: u32) {
        match replies {
            Ok(frames) if !self.muted => self.buf.extend_from_slice(&frames),
            Ok(_) => {}
            Err(failed) => {
                let missing = count.saturating_sub(failed.got);
                let e = ProxyError::from(&failed.error);
                self.stats.requests.error(e.kind(), u64::from(missing));
                if !self.muted {
                    self.buf.extend_from_slice(&failed.partial);
                }
                let unknown = matches!(
                    failed.error,
                    UpstreamError::ConnectionLost | UpstreamError::Timeout(_)
                );
                if unknown && self.close_on_lost {
                    // What the client's own connection to a Redis that went
                    // away would show: the replies so far, then the end.
                    // What follows is let go (its writes still published).
                    for slot in std::mem::take(&mut self.slots) {
                        self.orphan(slot);
                    }
                    self.replies = 0;
                    self.slots.push_back(Slot::Close);
                } else if !self.muted {
                    self.buf.extend_from_slice(&e.to_replies(missing as usize));
                }
            }
        }
    }
}

fn weight(slot: &Slot) -> usize {
    match slot {
        Slot::Ready(_) => 1,
        Slot::Upstream { count, .. } => *count as usize,
        Slot::Relay(_) | Slot::Mute(_) | Slot::Close => 0,
    }
}

impl Drop for Outbox {
    /// A client that leaves does not take back the writes it sent: those
    /// still unanswered are orphaned (see `Outbox::orphan`).
    fn drop(&mut self) {
        for slot in std::mem::take(&mut self.slots) {
            self.orphan(slot);
        }
    }
}

/// A receiver that already holds `replies` (for a slot whose replies were
/// taken out early).
fn answered(replies: Replies) -> oneshot::Receiver<Replies> {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(replies);
    rx
}

fn lost() -> Failed {
    Failed::nothing(UpstreamError::ConnectionLost)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn timing() -> Timing {
        Timing {
            path: crate::stats::Path::Shared,
            since: std::time::Instant::now(),
            command: "get",
        }
    }

    #[tokio::test]
    async fn replies_leave_in_slot_order_and_batch_when_ready() {
        let mut out = Outbox::new(Ack::default(), Arc::default());
        let (tx1, rx1) = oneshot::channel();
        let (tx2, rx2) = oneshot::channel();
        out.push(Slot::Ready(Bytes::from_static(b"+A\r\n")));
        out.push(Slot::Upstream {
            decode: None,
            rx: rx1,
            count: 1,
            blocking: false,
            inv: Invalidation::default(),
            timing: timing(),
        });
        out.push(Slot::Upstream {
            decode: None,
            rx: rx2,
            count: 1,
            blocking: false,
            inv: Invalidation::default(),
            timing: timing(),
        });
        // The second reply arrives first: it must wait behind the first.
        tx2.send(Ok(Bytes::from_static(b"+C\r\n"))).unwrap();
        assert!(!out.collect());
        assert_eq!(&out.buf[..], b"+A\r\n");
        tx1.send(Ok(Bytes::from_static(b"+B\r\n"))).unwrap();
        assert!(!out.collect());
        assert_eq!(&out.buf[..], b"+A\r\n+B\r\n+C\r\n");
        assert!(out.is_empty());
    }

    /// `Mute` takes effect where it stands in the queue: replies before it
    /// are written even if they arrive after it was queued.
    #[tokio::test]
    async fn muting_applies_in_queue_order() {
        let mut out = Outbox::new(Ack::default(), Arc::default());
        let (tx, rx) = oneshot::channel();
        out.push(Slot::Upstream {
            decode: None,
            rx,
            count: 1,
            blocking: false,
            inv: Invalidation::default(),
            timing: timing(),
        });
        out.push(Slot::Mute(true));
        out.put(b"+dropped\r\n");
        out.push(Slot::Mute(false));
        out.put(b"+kept\r\n");
        tx.send(Ok(Bytes::from_static(b"+first\r\n"))).unwrap();
        assert!(!out.collect());
        assert_eq!(&out.buf[..], b"+first\r\n+kept\r\n");
        // With nothing queued, muting is immediate.
        out.buf.clear();
        out.push(Slot::Mute(true));
        out.put(b"+dropped\r\n");
        out.put_bytes(Bytes::from_static(b"+dropped\r\n"));
        assert!(out.buf.is_empty());
        assert_eq!(out.pending_replies(), 0);
    }

    #[tokio::test]
    async fn a_failed_run_still_answers_every_command() {
        let mut out = Outbox::new(Ack::default(), Arc::default());
        let (tx, rx) = oneshot::channel();
        out.push(Slot::Upstream {
            decode: None,
            rx,
            count: 3,
            blocking: false,
            inv: Invalidation::default(),
            timing: timing(),
        });
        tx.send(Err(Failed {
            partial: Bytes::from_static(b":1\r\n"),
            got: 1,
            error: UpstreamError::ConnectionLost,
        }))
        .unwrap();
        out.ready().await;
        assert_eq!(
            &out.buf[..],
            b":1\r\n-ERR upstream connection lost\r\n-ERR upstream connection lost\r\n"
        );
    }

    #[tokio::test]
    async fn a_dropped_sender_is_a_lost_connection_not_a_hang() {
        let mut out = Outbox::new(Ack::default(), Arc::default());
        let (tx, rx) = oneshot::channel::<Replies>();
        out.push(Slot::Upstream {
            decode: None,
            rx,
            count: 1,
            blocking: false,
            inv: Invalidation::default(),
            timing: timing(),
        });
        drop(tx);
        assert!(!out.collect());
        assert_eq!(&out.buf[..], b"-ERR upstream connection lost\r\n");
    }

    #[tokio::test]
    async fn close_stops_collection() {
        let mut out = Outbox::new(Ack::default(), Arc::default());
        out.push(Slot::Ready(Bytes::from_static(b"+OK\r\n")));
        out.push(Slot::Close);
        assert!(out.collect());
        assert_eq!(&out.buf[..], b"+OK\r\n");
    }
}
