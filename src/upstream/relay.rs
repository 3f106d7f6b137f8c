//! What a relaying connection keeps (see [`Op::Relay`]): stand-ins for the
//! replies nearcache makes itself among Redis's frames ([`Op::Inject`]), and
//! the count of replies that tells when a relayed client's writes are
//! answered ([`Op::Ack`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};

#[cfg(doc)]
use super::Op;
use super::encode_command;
use crate::protocol::parser::parse_i64;
use crate::protocol::scanner::ReplyScanner;

/// Stand-ins kept per relay (see [`Op::Inject`]).
pub(super) const MAX_STAND_INS: usize = 65_536;

/// A callback for [`Op::Ack`]: runs once, when the replies it waits for
/// have come, or when it is dropped first (the connection went away) — the
/// commands before it may have run.
pub struct OnAnswer(Option<Box<dyn FnOnce() + Send>>);

impl OnAnswer {
    /// Wraps `then`.
    pub fn new(then: impl FnOnce() + Send + 'static) -> Self {
        Self(Some(Box::new(then)))
    }
}

impl Drop for OnAnswer {
    fn drop(&mut self) {
        if let Some(then) = self.0.take() {
            then();
        }
    }
}

impl std::fmt::Debug for OnAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnAnswer")
    }
}

/// A `PING <marker>` sent in a relay, whose answer is relayed as `reply`
/// (as `subscribed` for the RESP2 subscribed form; see [`Op::Inject`]).
#[derive(Debug)]
pub(super) struct StandIn {
    /// The answer: a bulk string, or in RESP2 subscribed mode `pong` and the
    /// bulk string in an array of two.
    bulk: Bytes,
    pubsub: Bytes,
    reply: Bytes,
    subscribed: Bytes,
}

/// What a relay knows of the replies to come, for [`Op::Ack`].
#[derive(Debug, Default)]
pub(super) struct Acks {
    /// Replies stopped being countable: acks queued from then on run at
    /// once.
    uncountable: bool,
    /// Replies other than pushes the commands written so far draw.
    due: u64,
    /// Such replies seen.
    seen: u64,
    /// Callbacks, each with the count it waits for.
    waiting: VecDeque<(u64, OnAnswer)>,
}

impl Acks {
    pub(super) fn expect(&mut self, replies: Option<u32>) {
        match replies {
            Some(n) => self.due += u64::from(n),
            // Acks already waiting still count right: every reply they wait
            // for comes before what the uncountable command draws.
            None => self.uncountable = true,
        }
    }

    pub(super) fn ack(&mut self, then: OnAnswer) {
        if !self.uncountable && self.seen < self.due {
            self.waiting.push_back((self.due, then));
        }
    }

    /// A relayed frame arrived.
    pub(super) fn saw(&mut self, frame: &[u8]) {
        if frame.first() == Some(&b'>') {
            return;
        }
        self.seen += 1;
        while self
            .waiting
            .front()
            .is_some_and(|(due, _)| *due <= self.seen)
        {
            self.waiting.pop_front();
        }
    }
}

impl StandIn {
    /// A stand-in for the next marker, and the `PING` to send for it.
    pub(super) fn new(reply: Bytes, subscribed: Bytes) -> (StandIn, Bytes) {
        static MARKER: AtomicU64 = AtomicU64::new(0);
        let n = MARKER.fetch_add(1, Ordering::Relaxed);
        let marker = format!("__nearcache:reply:{n}");
        let marker = marker.as_bytes();
        let bulk =
            Bytes::from([format!("${}\r\n", marker.len()).as_bytes(), marker, b"\r\n"].concat());
        let pubsub = Bytes::from([&b"*2\r\n$4\r\npong\r\n"[..], &bulk].concat());
        let ping = encode_command(&[&b"PING"[..], marker]);
        (
            StandIn {
                bulk,
                pubsub,
                reply,
                subscribed,
            },
            ping,
        )
    }

    pub(super) fn answers(&self, frame: &[u8]) -> bool {
        frame == &self.bulk[..] || frame == &self.pubsub[..]
    }

    /// What to relay for `frame`, the PING's answer.
    pub(super) fn into_reply(self, frame: &[u8]) -> Bytes {
        if frame == &self.pubsub[..] {
            self.subscribed
        } else {
            self.reply
        }
    }
}

/// Whether `frame` has the shape of a stand-in's answer (a bulk string
/// holding a marker, or RESP2 pub/sub's `pong` array of one), so that only
/// those are compared with each pending stand-in (under `CLIENT REPLY OFF`
/// they can pile up, and every relayed frame would be).
pub(super) fn may_answer_a_stand_in(frame: &[u8]) -> bool {
    const MARKER: &[u8] = b"__nearcache:reply:";
    let bulk = frame
        .strip_prefix(&b"*2\r\n$4\r\npong\r\n"[..])
        .unwrap_or(frame);
    bulk.first() == Some(&b'$')
        && bulk
            .iter()
            .position(|&b| b == b'\n')
            .is_some_and(|nl| bulk[nl + 1..].starts_with(MARKER))
}

/// A transaction's reply whose elements include stand-ins' answers (their
/// PINGs were queued with the rest, in a relayed MULTI): each becomes its
/// stand-in's reply. None when there is nothing to replace (the usual case
/// costs a first-byte test, or a search when stand-ins are pending).
pub(super) fn splice_stand_ins(frame: &Bytes, stand_ins: &mut VecDeque<StandIn>) -> Option<Bytes> {
    const MARKER: &[u8] = b"__nearcache:reply:";
    if stand_ins.is_empty()
        || frame.first() != Some(&b'*')
        || !frame.windows(MARKER.len()).any(|w| w == MARKER)
    {
        return None;
    }
    let header_end = frame.iter().position(|&b| b == b'\n')? + 1;
    let n = usize::try_from(parse_i64(&frame[1..header_end - 2])?).ok()?;
    let mut out = BytesMut::with_capacity(frame.len());
    out.extend_from_slice(&frame[..header_end]);
    let mut at = header_end;
    for _ in 0..n {
        let len = ReplyScanner::new().scan(&frame[at..]).ok()??;
        let element = &frame[at..at + len];
        let reply = stand_ins
            .iter()
            .position(|s| s.answers(element))
            .and_then(|i| stand_ins.remove(i))
            .map(|s| s.into_reply(element));
        out.extend_from_slice(reply.as_deref().unwrap_or(element));
        at += len;
    }
    out.extend_from_slice(&frame[at..]);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn only_marker_shaped_frames_are_compared_with_stand_ins() {
        let (stand_in, ping) = StandIn::new(Bytes::from_static(b":7\r\n"), Bytes::new());
        assert!(ping.starts_with(b"*2\r\n$4\r\nPING\r\n"));
        assert!(may_answer_a_stand_in(&stand_in.bulk));
        assert!(may_answer_a_stand_in(&stand_in.pubsub));
        assert!(stand_in.answers(&stand_in.bulk));
        for other in [
            &b"+PONG\r\n"[..],
            b"$5\r\nhello\r\n",
            b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nm\r\n",
            b"*2\r\n$4\r\npong\r\n$0\r\n\r\n",
            b"$",
        ] {
            assert!(!may_answer_a_stand_in(other), "{other:?}");
        }
        assert_eq!(&stand_in.into_reply(b"")[..], b":7\r\n");
    }

    #[test]
    fn acks_wait_for_replies_not_pushes() {
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = |ran: &Arc<std::sync::atomic::AtomicUsize>| {
            let ran = ran.clone();
            OnAnswer::new(move || {
                ran.fetch_add(1, Ordering::SeqCst);
            })
        };
        let mut acks = Acks::default();
        acks.expect(Some(2));
        acks.ack(counter(&ran));
        acks.saw(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n");
        acks.saw(b"+OK\r\n");
        assert_eq!(ran.load(Ordering::SeqCst), 0, "a push is no reply");
        acks.saw(b"+OK\r\n");
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        // Nothing outstanding: at once. Uncountable: at once, and from then on.
        acks.ack(counter(&ran));
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        acks.expect(Some(1));
        acks.ack(counter(&ran));
        acks.expect(None);
        assert_eq!(ran.load(Ordering::SeqCst), 2, "still waits for its reply");
        acks.saw(b"+OK\r\n");
        assert_eq!(ran.load(Ordering::SeqCst), 3);
        acks.expect(Some(1));
        acks.ack(counter(&ran));
        assert_eq!(ran.load(Ordering::SeqCst), 4, "uncountable: at once");
    }
}
