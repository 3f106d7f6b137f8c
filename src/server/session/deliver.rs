//! Getting commands to Redis and replies to the client.
//!
//! - **Forwarding.** Consecutive forwarded commands of one read go upstream
//!   as one run: one message to the connection task, the client's own bytes
//!   untouched, one reply slot for all of them.
//! - **Two delivery primitives** for replies nearcache makes itself, so that
//!   each lands where the mode needs it: [`Session::answer`] (the command's
//!   reply, as Redis would place it) and [`Session::refuse`] (nearcache will
//!   not run it). Every reply or refusal nearcache makes goes through them.
//! - **`CLIENT REPLY`**: nearcache drops replies itself (outside a relay),
//!   so Redis still answers every command and writes are acknowledged.

use std::ops::Range;

use bytes::Bytes;

use super::mode::Mode;
use super::{Flow, Request, Session, local};
use crate::cache::Invalidation;
use crate::error::ProxyError;
use crate::protocol::reply::{self, OK};
use crate::server::outbox::Slot;
use crate::server::route::Route;
use crate::stats::{Path, Timing};
use crate::upstream::{Conn, Op, UpstreamError, encode_command};

/// Where forwarded commands go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    /// The sticky shared connection.
    Shared,
    /// The pinned connection.
    Pinned,
    /// A dedicated connection the lane keeps for a run of scripts, so that a
    /// script running long never holds up a shared connection: other
    /// clients get Redis's `-BUSY` meanwhile, as directly, and `SCRIPT KILL`
    /// gets through.
    Script,
}

/// Consecutive forwarded commands not yet sent.
pub(super) struct Run {
    chunk: Bytes,
    frames: Range<usize>,
    count: u32,
    to: Target,
    /// The first command's name, for the slow log.
    first: &'static str,
}

/// Longest run of commands sent upstream as one request, so that replies to a
/// huge pipeline start flowing back before all of it is answered.
const MAX_RUN: u32 = 256;

impl Session {
    /// Adds the command to the pending run (or sends it alone when it does
    /// not go as the client's bytes), to the pinned connection if pinned.
    pub(super) async fn forward(&mut self, req: &Request<'_>) {
        let to = if self.mode.pinned() {
            Target::Pinned
        } else if req.route == Route::Script {
            Target::Script
        } else {
            Target::Shared
        };
        let mut decode = req.decode.clone();
        if let Mode::Transaction(_, txn) = &mut self.mode {
            txn.queued += 1;
            // (Answered +QUEUED now; the values come in EXEC's reply, at
            // this command's place among those Redis queued.)
            if let Some(how) = decode.take() {
                txn.decode.push((txn.queued as usize - 1, how));
            }
        }
        // A reply to decompress has a slot of its own.
        let frame = req.frame().filter(|_| decode.is_none());
        let Some(frame) = frame else {
            self.flush_run().await;
            let inv = std::mem::take(&mut self.batch.pending_inv);
            self.send_upstream(req.bytes(), 1, to, inv, req.name())
                .await;
            if let Some(how) = decode {
                self.out.decode_last(how);
            }
            return;
        };
        let batch = &mut self.batch;
        if let Some(run) = &mut batch.run {
            let joins = run.to == to
                && run.frames.end == frame.start
                && run.count < MAX_RUN
                && run.chunk.as_ptr() == req.chunk().as_ptr();
            if joins {
                run.frames.end = frame.end;
                run.count += 1;
                batch.run_inv.extend(std::mem::take(&mut batch.pending_inv));
                return;
            }
        }
        // The previous run leaves with its own keys; this command's go with it.
        self.flush_run().await;
        self.batch.run_inv = std::mem::take(&mut self.batch.pending_inv);
        self.batch.run = Some(Run {
            chunk: req.chunk().clone(),
            frames: frame,
            count: 1,
            to,
            first: req.name(),
        });
    }

    /// Sends the pending run, if any.
    pub(super) async fn flush_run(&mut self) {
        if let Some(run) = self.batch.run.take() {
            let inv = std::mem::take(&mut self.batch.run_inv);
            let frames = run.chunk.slice(run.frames);
            self.send_upstream(frames, run.count, run.to, inv, run.first)
                .await;
        }
    }

    /// Sends `count` commands upstream (the first named `command`) and
    /// queues the slot for their replies.
    pub(super) async fn send_upstream(
        &mut self,
        frames: Bytes,
        count: u32,
        to: Target,
        inv: Invalidation,
        command: &'static str,
    ) {
        if to == Target::Pinned {
            return self.send_pinned(frames, count, false, inv, command).await;
        }
        let (op, rx) = Op::request(frames, count, false);
        let (sent, path) = if to == Target::Script {
            (self.lane.send_script(op, &mut self.out).await, Path::Script)
        } else {
            (self.lane.send_shared(op, &mut self.out).await, Path::Shared)
        };
        match sent {
            Ok(()) => self.out.push(Slot::Upstream {
                decode: None,
                rx,
                count,
                blocking: false,
                inv,
                timing: self.timing(path, command),
            }),
            Err(e) => self.fail(&e, count),
        }
    }

    /// Sends commands over the pinned connection (written only, when
    /// relaying: the replies come back as relayed frames).
    pub(super) async fn send_pinned(
        &mut self,
        frames: Bytes,
        count: u32,
        blocking: bool,
        inv: Invalidation,
        command: &'static str,
    ) {
        if let Some(pin) = self.mode.pin() {
            let conn = pin.conn.clone();
            self.lane.order_for(&conn, &mut self.out).await;
        }
        match &mut self.mode {
            Mode::Shared => self.fail(&UpstreamError::ConnectionLost, count),
            Mode::Relay(pin, book) => {
                let replies = book.countable.then(|| std::mem::take(&mut book.due));
                // A dead relay connection closes the client (see
                // `Session::relay_lost`): the command's fate is unknown.
                let _ = pin.conn.send(Op::Write { frames, replies });
            }
            Mode::Pinned(pin) | Mode::Transaction(pin, _) => {
                let (mut op, rx) = Op::request(frames, count, blocking);
                if !blocking {
                    if let Err(e) = self.lane.admit(&mut op).await {
                        // Not sent: inside MULTI, EXEC must not run the rest.
                        if let Mode::Transaction(pin, _) = &self.mode {
                            abort_at_exec(&pin.conn);
                        }
                        return self.fail(&e, count);
                    }
                }
                if pin.conn.send(op).is_err() {
                    // The dedicated connection died: its state (MULTI,
                    // WATCH) is gone, so the client must hear about it.
                    self.mode = Mode::Shared;
                    return self.fail(&UpstreamError::ConnectionLost, count);
                }
                let path = if blocking {
                    Path::Blocking
                } else {
                    Path::Pinned
                };
                self.out.push(Slot::Upstream {
                    decode: None,
                    rx,
                    count,
                    blocking,
                    inv,
                    timing: self.timing(path, command),
                });
            }
        }
    }

    /// When the commands being handled were read, for their replies'
    /// latency (and the first one's name, for the slow log).
    #[inline]
    pub(super) fn timing(&self, path: Path, command: &'static str) -> Timing {
        Timing {
            path,
            since: self.read_at,
            command,
        }
    }

    /// `count` commands the upstream could not take: one error each.
    pub(super) fn fail(&mut self, e: &UpstreamError, count: u32) {
        let e = ProxyError::from(e);
        self.ctx.stats.requests.error(e.kind(), u64::from(count));
        self.out.put_bytes(e.to_replies(count as usize));
    }

    /// The reply to the current command that nearcache makes itself, placed
    /// where Redis would place it: after every earlier reply; in a relay,
    /// among Redis's frames (see [`Op::Inject`]), where Redis's refusal to a
    /// RESP2 subscriber is relayed instead if the client turns out to be one.
    pub(super) async fn answer(&mut self, req: &Request<'_>, reply: Bytes) {
        if let Mode::Relay(..) = self.mode {
            let subscribed = subscribed_refusal(req);
            return self.inject(reply, subscribed).await;
        }
        self.out.put_bytes(reply);
    }

    /// nearcache will not run the current command: `e` is its reply, in
    /// every mode. Inside MULTI, Redis is made to abort the transaction at
    /// EXEC, as when it refuses a command while queuing; in a relay the
    /// refusal takes its place among Redis's frames (nearcache decides before
    /// Redis sees the command, so it stands whatever state Redis is in).
    pub(super) async fn refuse(&mut self, e: ProxyError) {
        self.ctx.stats.requests.error(e.kind(), 1);
        // Forwarded commands read before it answer before it.
        self.flush_run().await;
        match &self.mode {
            Mode::Transaction(pin, _) => {
                abort_at_exec(&pin.conn);
                self.out.put_bytes(e.to_reply());
            }
            Mode::Relay(..) => {
                let reply = e.to_reply();
                self.inject(reply.clone(), reply).await;
            }
            Mode::Shared | Mode::Pinned(_) => self.out.put_bytes(e.to_reply()),
        }
    }

    /// In a relay, `reply` stands in for a PING's answer (see
    /// [`Op::Inject`]); `subscribed` is relayed instead when the PING shows
    /// Redis treats the client as a RESP2 subscriber. A client that is
    /// closing gets it at once, as its last word.
    pub(super) async fn inject(&mut self, reply: Bytes, subscribed: Bytes) {
        self.flush_run().await;
        let closing = self.client.closing;
        if let Mode::Relay(pin, _) = &self.mode {
            let _ = pin.conn.send(if closing {
                Op::InjectLast(reply)
            } else {
                Op::Inject { reply, subscribed }
            });
        }
        if closing {
            self.end_relay();
        }
    }

    /// The command after `CLIENT REPLY SKIP`: handled with its reply dropped,
    /// unless it is a `CLIENT REPLY` that sets the mode anew (an `ON`
    /// answers), as in Redis.
    pub(super) async fn handle_skipped(&mut self, req: &mut Request<'_>) -> Flow {
        self.muting.skip_next = false;
        if local::reply_mode(&req.argv).is_some() {
            return self.handle(req).await;
        }
        self.flush_run().await;
        self.out.push(Slot::Mute(true));
        self.muting.skipping = true;
        let flow = self.handle(req).await;
        self.muting.skipping = false;
        self.flush_run().await;
        self.out.push(Slot::Mute(false));
        flow
    }

    /// `CLIENT REPLY ON|OFF|SKIP` outside a relay: nearcache drops the
    /// replies itself, so Redis still answers every command and writes are
    /// acknowledged (invalidated, published) as usual.
    pub(super) fn client_reply(&mut self, req: &Request<'_>) {
        match local::reply_mode(&req.argv) {
            Some(local::ReplyMode::On) => {
                if std::mem::take(&mut self.muting.off) {
                    self.out.push(Slot::Mute(false));
                }
                self.out.put_bytes(Bytes::from_static(OK));
            }
            Some(local::ReplyMode::Off) => {
                if !std::mem::replace(&mut self.muting.off, true) {
                    self.out.push(Slot::Mute(true));
                }
            }
            // (Under OFF, Redis ignores it.)
            Some(local::ReplyMode::Skip) => self.muting.skip_next = !self.muting.off,
            None => self.out.put_bytes(reply::error("ERR syntax error")),
        }
    }
}

/// What Redis answers a RESP2 subscriber for anything but (un)subscribing,
/// PING, QUIT and RESET (arity is checked first).
pub(super) fn subscribed_refusal(req: &Request<'_>) -> Bytes {
    reply::error(&format!(
        "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
        req.name()
    ))
}

/// Makes Redis fail the transaction open on `conn` at EXEC with EXECABORT,
/// as for a command it refuses while queuing: a command with the wrong
/// arity, whose reply nobody reads.
pub(super) fn abort_at_exec(conn: &Conn) {
    let (poison, _unread) = Op::request(encode_command(&["GET"]), 1, false);
    let _ = conn.send(poison);
}
