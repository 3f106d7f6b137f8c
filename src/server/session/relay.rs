//! Relay mode: after a subscription, `MONITOR` or `CLIENT TRACKING on`,
//! replies no longer pair with commands, so the pinned connection's every
//! frame is relayed to the client as it arrives. Everything goes to Redis
//! except what only nearcache can answer, whose replies stand in for a
//! PING's answer so they keep their place ([`Session::answer`]).
//!
//! The relayed client's writes must still reach every L1: nearcache counts
//! the replies relayed (pushes aside) and, once Redis has answered a batch
//! of writes, acknowledges them ([`Session::ack_relayed`]); where replies
//! cannot be counted they are published as they are sent.

use bytes::Bytes;
use tokio::sync::mpsc;

use super::mode::{Mode, RelayBook};
use super::{Flow, Request, Session, local, owned};
use crate::cache::Invalidation;
use crate::error::ProxyError;
use crate::protocol::parser::parse_i64;
use crate::protocol::reply::Protocol;
use crate::server::outbox::Slot;
use crate::server::route::Route;
use crate::upstream::connection::FrameWatch;
use crate::upstream::{OnAnswer, Op, UpstreamError, encode_command};

/// Keys a relayed transaction keeps for its second acknowledgement, at most.
const MAX_TXN_KEYS: usize = 65_536;

impl Session {
    /// Handles a command in [`Mode::Relay`].
    pub(super) async fn relayed(&mut self, req: &mut Request<'_>) -> Flow {
        // Only Redis knows whether the client is still subscribed when the
        // command runs (its answer to the stand-in's PING tells). A command
        // with effects cannot wait for that: while the client may be
        // subscribed, Redis would refuse it, so it is refused here.
        let maybe_subscribed = self.maybe_subscribed();
        match req.route {
            Route::ClientKill | Route::ClientSetName | Route::Hello if maybe_subscribed => {
                let refused = super::deliver::subscribed_refusal(req);
                self.inject(refused.clone(), refused).await;
                Flow::Continue
            }
            // (CLIENT SETNAME acts at once, so it is Redis's to refuse: it
            // is relayed, and its name noted.)
            route if route.answered_locally() && route != Route::ClientSetName => {
                self.local(req).await
            }
            Route::Refuse(msg) => {
                self.refuse(ProxyError::unsupported(msg)).await;
                Flow::Continue
            }
            _ => self.relay_forward(req, maybe_subscribed).await,
        }
    }

    /// Whether Redis may treat the client as a RESP2 subscriber.
    fn maybe_subscribed(&self) -> bool {
        self.client.proto == Protocol::Resp2 && self.enrollment.pubsub()
    }

    /// A relayed command: written to the pinned connection, its replies
    /// counted where they can be.
    async fn relay_forward(&mut self, req: &Request<'_>, maybe_subscribed: bool) -> Flow {
        // Writes so far are acknowledged before anything that may change how
        // Redis answers (CLIENT REPLY, MULTI, RESET…).
        if req.route != Route::Forward {
            self.ack_relayed().await;
        }
        // (CLIENT REPLY here is Redis's to apply.)
        match req.route {
            Route::Select => {
                if let Some(db) = req.argv.get(1).and_then(|a| parse_i64(a)) {
                    self.client.db = u32::try_from(db).unwrap_or(self.client.db);
                }
                // Redis may refuse it (out of range, a RESP2 subscriber) or
                // never run it (a transaction that fails): the database of
                // later writes is then unknown here.
                self.client.db_uncertain = true;
            }
            Route::Hello => {
                if let Some(p) = local::requested_protocol(&req.argv) {
                    self.client.proto = p;
                }
            }
            Route::ClientSetName => self.client.name = req.argv.get(2).map(owned),
            Route::Relay => self.note_subscribe(req),
            _ => {}
        }
        if let Mode::Relay(_, book) = &mut self.mode {
            match req.route {
                // Queued writes run at EXEC: acknowledged after it.
                Route::Multi => book.multi = true,
                Route::EndTransaction => book.multi = false,
                _ => {}
            }
            // A relayed write has no reply slot to carry its keys: they wait
            // for its replies to be counted (see `ack_relayed`). (A command
            // refused for its arity, or queued in MULTI, draws one reply
            // whatever it is.)
            let replies = if matches!(req.route, Route::WrongArity(_)) {
                Some(1)
            } else {
                relay_replies(&req.argv, maybe_subscribed, book.multi)
            };
            match replies {
                Some(n) => book.due += n,
                None => book.countable = false,
            }
        }
        let inv = std::mem::take(&mut self.batch.pending_inv);
        self.forward(req).await;
        if let Mode::Relay(_, book) = &mut self.mode {
            book.inv.extend(inv);
        }
        match req.route {
            Route::Quit => Flow::Stop,
            Route::Reset => {
                // The relay ends with Redis's +RESET; the connection closes
                // after it, and the session starts afresh.
                self.flush_run().await;
                self.end_relay();
                self.reset_state();
                Flow::Continue
            }
            _ => Flow::Continue,
        }
    }

    /// Switches to relay mode with the current command as the first relayed
    /// one (from the shared connections, or pinned by WATCH).
    pub(super) async fn start_relay(&mut self, req: &Request<'_>) {
        self.flush_run().await;
        if !self.mode.pinned() && !self.pin_held() && !self.pin_dedicated().await {
            return;
        }
        let mut frames = req.bytes();
        // Replies dropped here so far are Redis's to drop from now on (it
        // tells them from the pushes it must still send).
        let mode = if self.muting.off {
            Some("OFF")
        } else if self.muting.skipping {
            Some("SKIP")
        } else {
            None
        };
        if let Some(mode) = mode {
            frames = [&encode_command(&["CLIENT", "REPLY", mode])[..], &frames[..]]
                .concat()
                .into();
            self.out.push(Slot::Mute(false));
            self.muting.off = false;
        }
        let (tx, rx) = mpsc::channel(1024);
        if let Some(pin) = self.mode.pin() {
            let conn = pin.conn.clone();
            self.lane.order_for(&conn, &mut self.out).await;
        }
        // (Replies are counted from here, where they can be: see `Op::Ack`.)
        let replies = if mode.is_some() {
            None
        } else {
            relay_replies(&req.argv, self.maybe_subscribed(), false)
        };
        let Some(mut pin) = self.mode.unpin() else {
            return;
        };
        if pin
            .conn
            .send(Op::Relay {
                frames,
                tx,
                replies,
                watch: {
                    // Redis's (un)subscribe replies say when the client has
                    // left every channel; MONITOR's lines show nearcache's
                    // own connections too.
                    let mut subscriptions = self.enrollment.subscriptions();
                    let mut monitor = MonitorFilter::default();
                    FrameWatch(Box::new(move |frame: &[u8]| {
                        subscriptions.saw(frame);
                        monitor.keeps(frame)
                    }))
                },
            })
            .is_err()
        {
            return self.fail(&UpstreamError::ConnectionLost, 1);
        }
        pin.dirty = true;
        let book = RelayBook {
            countable: replies.is_some(),
            ..Default::default()
        };
        self.mode = Mode::Relay(pin, book);
        self.out.push(Slot::Relay(rx));
        self.note_subscribe(req);
    }

    /// Whether the relay's connection to Redis died under it (Redis went
    /// away or restarted): the relay's slot has ended, or its connection is
    /// closed, while the session still relays. Redis's own connection to
    /// the client would close then, and with it the subscriptions or the
    /// tracking, so the client's library reconnects and sets them up again.
    pub(super) fn relay_lost(&self) -> bool {
        match &self.mode {
            Mode::Relay(pin, _) => pin.conn.is_closed() || !self.out.has_relay(),
            _ => false,
        }
    }

    /// Closes the client after [`Session::relay_lost`]: what it was told so
    /// far is written, then the connection closes. Its relayed writes are
    /// still published (their outcome is unknown).
    pub(super) fn close_lost_relay(&mut self) -> Flow {
        tracing::info!(
            client = self.client.id,
            "relayed connection to Redis lost; closing the client (subscriptions and tracking end with it, as with Redis directly)"
        );
        self.end_relay();
        self.close()
    }

    /// Leaves relay mode without Redis's say (the relay connection died, the
    /// client left, the server shuts down): the writes not yet acknowledged
    /// are published now, as they may have run.
    pub(super) fn end_relay(&mut self) {
        if !matches!(self.mode, Mode::Relay(..)) {
            return;
        }
        if let Mode::Relay(_, mut book) = std::mem::replace(&mut self.mode, Mode::Shared) {
            let mut inv = std::mem::take(&mut book.inv);
            inv.extend(std::mem::take(&mut book.txn_inv));
            self.ctx.ack.acknowledged(&inv, &mut self.scratch.ids);
        }
    }

    /// Has the writes relayed since the last acknowledgement invalidated
    /// (locally again, and on peers) once Redis has answered them: an
    /// [`Op::Ack`], which counts the relay's replies. Where they cannot be
    /// counted (see `RelayBook::countable`), they are published now instead,
    /// as they are sent.
    pub(super) async fn ack_relayed(&mut self) {
        let Mode::Relay(_, book) = &mut self.mode else {
            return;
        };
        // Inside MULTI a write is acknowledged twice: at its reply (Redis may
        // have refused the MULTI, and then it ran) and after EXEC (else it
        // runs there). The second copy is bounded: beyond that many keys, a
        // flush stands in for them.
        let mut inv = std::mem::take(&mut book.inv);
        if book.multi {
            if book.txn_inv.keys.len() + inv.keys.len() > MAX_TXN_KEYS {
                book.txn_inv = Invalidation {
                    keys: Vec::new(),
                    flush: true,
                };
            } else {
                book.txn_inv.keys.extend(inv.keys.iter().cloned());
                book.txn_inv.flush |= inv.flush;
            }
        } else {
            inv.extend(std::mem::take(&mut book.txn_inv));
        }
        if inv.is_empty() {
            return;
        }
        self.flush_run().await;
        let ack = self.ctx.ack.clone();
        let acknowledged = OnAnswer::new(move || ack.acknowledged(&inv, &mut Vec::new()));
        match &self.mode {
            // (A failed send drops the callback, which runs it.)
            Mode::Relay(pin, book) if book.countable => {
                let _ = pin.conn.send(Op::Ack(acknowledged));
            }
            _ => drop(acknowledged),
        }
    }

    /// A SUBSCRIBE of any kind makes the client `pubsub` for `CLIENT KILL
    /// TYPE` (until RESET: unsubscribing from everything is not tracked).
    fn note_subscribe(&self, req: &Request<'_>) {
        let name = &req.argv[0];
        if [&b"subscribe"[..], b"psubscribe", b"ssubscribe"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
        {
            self.enrollment.set_pubsub(true);
        }
    }
}

/// Keeps nearcache's own commands out of a `MONITOR` client's view where
/// they can be told apart: the handshake of every connection it opens
/// (`HELLO … SETNAME nearcache`) and what that connection sends right after
/// it (its `SELECT`, the `INFO server` and `INFO replication` that tell the
/// server's identity, a probe's `CLIENT LIST ID`, tracking's `CLIENT
/// TRACKING`), and the commands that carry a `__nearcache:` marker (the
/// stand-ins' `PING`s, `WAIT`'s `PUBLISH`). What stays visible is in the
/// README (a miss's `PTTL`, the commands L1 answers not showing at all).
#[derive(Default)]
struct MonitorFilter {
    /// The addresses of connections whose handshake was just hidden (and
    /// whose follow-ups still are), oldest first.
    handshaken: Vec<Vec<u8>>,
}

/// Connections handshaking at once that the filter tells apart.
const HANDSHAKES_TRACKED: usize = 32;

impl MonitorFilter {
    fn keeps(&mut self, frame: &[u8]) -> bool {
        // A MONITOR line: `+<seconds>.<micros> [<db> <addr>] "cmd" "arg"…`.
        if frame.first() != Some(&b'+') || !frame.get(1).is_some_and(u8::is_ascii_digit) {
            return true;
        }
        let Some(open) = frame.iter().position(|&b| b == b'[') else {
            return true;
        };
        let Some(close) = frame.iter().position(|&b| b == b']') else {
            return true;
        };
        let (whence, line) = (&frame[open..=close], &frame[close..]);
        // (The database in `whence` moves with a SELECT: the address is
        // what names the connection.)
        let addr = whence
            .iter()
            .position(|&b| b == b' ')
            .map_or(whence, |i| &whence[i..]);
        let contains = |needle: &[u8]| line.windows(needle.len()).any(|w| w == needle);
        let handshake = line.starts_with(b"] \"HELLO\"") && contains(b"\"SETNAME\" \"nearcache\"");
        if handshake {
            if self.handshaken.len() == HANDSHAKES_TRACKED {
                self.handshaken.remove(0);
            }
            self.handshaken.push(addr.to_vec());
            return false;
        }
        if let Some(i) = self.handshaken.iter().position(|a| a == addr) {
            let follow_up = [
                &b"] \"SELECT\""[..],
                b"] \"INFO\" \"server\"",
                b"] \"INFO\" \"replication\"",
                b"] \"CLIENT\" \"LIST\" \"ID\"",
                b"] \"CLIENT\" \"TRACKING\"",
            ]
            .iter()
            .any(|c| line.starts_with(c));
            if follow_up {
                return false;
            }
            self.handshaken.remove(i);
        }
        !contains(b"\"__nearcache:")
    }
}

/// How many replies other than pushes a relayed command draws, if that is
/// known: one (`+QUEUED` in MULTI), and unknown for an (un)subscribe (pushes
/// alone, or an error) and where replies stop being one per command
/// (MONITOR, `CLIENT REPLY`, a protocol switch, a RESP2 client that may be
/// subscribed, whose messages are not pushes).
fn relay_replies(argv: &[Bytes], maybe_subscribed: bool, queued: bool) -> Option<u32> {
    let is = |name: &str| argv[0].eq_ignore_ascii_case(name.as_bytes());
    let subscription = [
        "subscribe",
        "psubscribe",
        "ssubscribe",
        "unsubscribe",
        "punsubscribe",
        "sunsubscribe",
    ]
    .into_iter()
    .any(is);
    let client_reply = is("client")
        && argv
            .get(1)
            .is_some_and(|a| a.eq_ignore_ascii_case(b"reply"));
    if maybe_subscribed || is("monitor") || is("hello") || client_reply {
        return None;
    }
    // (Queued in MULTI: `+QUEUED`. Otherwise a subscription draws pushes
    // alone, or one error if Redis refuses it before it runs — busy, or an
    // ACL — which nothing here can tell apart.)
    (!subscription || queued).then_some(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_lines_of_nearcache_s_own_connections_are_held_back() {
        let mut f = MonitorFilter::default();
        let hello =
            b"+1701.000001 [0 127.0.0.1:50001] \"HELLO\" \"2\" \"SETNAME\" \"nearcache\"\r\n";
        let select = b"+1701.000002 [0 127.0.0.1:50001] \"SELECT\" \"3\"\r\n";
        let users = b"+1701.000003 [3 127.0.0.1:50002] \"SELECT\" \"3\"\r\n";
        let marker = b"+1701.000004 [0 127.0.0.1:50003] \"PING\" \"__nearcache:reply:7\"\r\n";
        let get = b"+1701.000005 [0 127.0.0.1:50003] \"GET\" \"k\"\r\n";
        assert!(!f.keeps(hello));
        assert!(!f.keeps(select), "the handshake's own SELECT");
        assert!(f.keeps(users), "a client's SELECT");
        assert!(!f.keeps(marker));
        assert!(f.keeps(get));
        assert!(f.keeps(b"+OK\r\n"));
        assert!(f.keeps(b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nb\r\n"));
    }

    #[test]
    fn relayed_replies_are_counted_where_they_can_be() {
        let argv = |args: &[&str]| -> Vec<Bytes> {
            args.iter()
                .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                .collect()
        };
        let count =
            |args: &[&str], subscribed, queued| relay_replies(&argv(args), subscribed, queued);
        assert_eq!(count(&["SET", "k", "v"], false, false), Some(1));
        assert_eq!(count(&["subscribe", "a", "b"], false, false), None);
        assert_eq!(count(&["SUBSCRIBE", "a"], false, true), Some(1));
        assert_eq!(count(&["GET", "k"], true, false), None);
        for uncountable in [
            &["MONITOR"][..],
            &["HELLO", "2"],
            &["client", "REPLY", "on"],
        ] {
            assert_eq!(count(uncountable, false, false), None, "{uncountable:?}");
        }
        assert_eq!(count(&["CLIENT", "ID"], false, false), Some(1));
    }
}
