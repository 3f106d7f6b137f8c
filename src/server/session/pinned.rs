//! State only Redis can keep — a transaction, a watch, a blocked command,
//! subscriptions, MONITOR, tracking — pins the session to a dedicated
//! upstream connection for as long as it lasts: taking one, relaying on it,
//! answering at EXEC what nearcache queued itself, and letting it go.

use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use super::Session;
use crate::cache::Invalidation;
use crate::command::CommandSpec;
use crate::protocol::ReplyScanner;
use crate::protocol::parser::parse_i64;
use crate::protocol::reply::{self, Protocol};
use crate::server::directory::Listing;
use crate::server::outbox::Slot;
use crate::server::route::Route;
use crate::upstream::connection::Failed;
use crate::upstream::{Conn, Op, Pool, Replies, UpstreamError, encode_command};

/// A dedicated upstream connection held by this session.
pub(super) struct Pin {
    pub(super) conn: Conn,
    /// Every frame is relayed (pub/sub, MONITOR…): replies do not pair with commands.
    pub(super) relay: bool,
    pub(super) in_multi: bool,
    pub(super) watching: bool,
    /// The connection's own state no longer matches its pool (SELECT or HELLO
    /// inside the pin), so it must be closed rather than reused.
    pub(super) dirty: bool,
    /// Keys written inside MULTI, applied at EXEC.
    pub(super) txn_inv: Invalidation,
    /// Commands Redis queued since MULTI.
    pub(super) txn_queued: u32,
    /// Commands inside MULTI that nearcache answers itself (AUTH, CLIENT
    /// SETNAME, GETNAME, ID, KILL, NO-EVICT, LIST, INFO): Redis queues them
    /// and runs them at EXEC, so they are answered there, spliced into EXEC's
    /// reply after the `u32` queued commands before them.
    pub(super) txn_local: Vec<(u32, Route, Vec<Bytes>)>,
    /// This session in the directory of pinned sessions, while pinned.
    pub(super) _listing: Option<Listing>,
}

impl Session {
    /// Queues the slot of a command that may block, answered on `rx` by the
    /// task that runs it (with the keys it writes).
    fn push_blocking(&mut self, rx: oneshot::Receiver<Replies>) {
        let inv = std::mem::take(&mut self.pending_inv);
        self.push(Slot::Upstream {
            rx,
            count: 1,
            blocking: true,
            inv,
        });
    }

    /// Counts a command sent to the pinned connection inside MULTI (Redis
    /// queues it), for [`Session::exec_local`]'s splicing.
    pub(super) fn count_queued(&mut self) {
        if let Some(pin) = self.pin.as_mut().filter(|p| p.in_multi) {
            pin.txn_queued += 1;
        }
    }

    /// Runs a blocking command on a dedicated connection that goes back to the
    /// idle list once it answers (or is closed if the client leaves first).
    pub(super) async fn blocking(&mut self, chunk: &Bytes, frame: Option<Range<usize>>) {
        self.flush_run(chunk).await;
        let frames = match frame {
            Some(f) => chunk.slice(f),
            None => encode_command(&self.argv),
        };
        let conn = match self.pool.dedicated().await {
            Ok(conn) => conn,
            Err(e) => return self.reply(e.to_reply()),
        };
        self.order_after(conn.serial()).await;
        let (op, rx) = Op::request(frames, 1, true);
        // While blocked, `CLIENT UNBLOCK <this client's id>` finds it here.
        let listing =
            (conn.redis_id() != 0).then(|| self.ctx.directory.list(self.id, conn.redis_id()));
        if conn.send(op).is_err() {
            return self.reply(UpstreamError::ConnectionLost.to_reply());
        }
        let (mut client_tx, client_rx) = oneshot::channel();
        tokio::spawn(async move {
            tokio::select! {
                replies = rx => {
                    // Unlisted before the connection can serve another
                    // client, so an unblock by this id never reaches theirs.
                    drop(listing);
                    let _ = conn.send(Op::Release(conn.clone()));
                    let _ = client_tx.send(replies.unwrap_or_else(|_| {
                        Err(Failed::nothing(UpstreamError::ConnectionLost))
                    }));
                }
                // The client left: dropping `rx` tells the connection nobody
                // waits, and it closes rather than let the pop take an item.
                _ = client_tx.closed() => {}
            }
        });
        self.push_blocking(client_rx);
    }

    /// Pins a dedicated connection; on failure the client has its error reply.
    /// `WAIT` (or `WAITAOF`) outside a transaction. On the shared connection
    /// it would hold every other client's commands behind it for up to its
    /// timeout, so it runs on a dedicated one. But Redis counts acks up to the
    /// replication offset it recorded for *the connection WAIT runs on* (its
    /// last write, documented; its last command of any kind, as 7.0 does),
    /// and a reused dedicated connection's is stale: WAIT would report
    /// replicas that never saw this client's writes. So, once the client's
    /// earlier commands are done (a PING behind them on its shared
    /// connection), the dedicated connection first makes a write of its own
    /// that replicates — `PUBLISH __nearcache:wait ""`, which no one receives
    /// — and then waits: for acks up to now, which covers the client's writes.
    pub(super) async fn wait(&mut self, chunk: &Bytes, frame: Option<Range<usize>>) {
        self.flush_run(chunk).await;
        let mut frames = BytesMut::from(&encode_command(&[&b"PUBLISH"[..], WAIT_CHANNEL, b""])[..]);
        match frame {
            Some(f) => frames.extend_from_slice(&chunk[f]),
            None => frames.extend_from_slice(&encode_command(&self.argv)),
        }
        let (barrier_tx, barrier) = oneshot::channel();
        let barrier_sent = match self.shared_conn().await {
            Ok(conn) => conn.send(Op::Send {
                frames: encode_command(&[&b"PING"[..]]),
                replies: 1,
                blocking: false,
                tx: barrier_tx,
            }),
            Err(e) => return self.reply(e.to_reply()),
        };
        if barrier_sent.is_err() {
            return self.reply(UpstreamError::ConnectionLost.to_reply());
        }
        let pool = self.pool.clone();
        let (mut client_tx, client_rx) = oneshot::channel();
        tokio::spawn(async move {
            let reply = wait_after(barrier, pool, frames.freeze(), &mut client_tx).await;
            let _ = client_tx.send(reply);
        });
        self.push_blocking(client_rx);
    }

    pub(super) async fn pin_dedicated(&mut self) -> bool {
        match self.pool.dedicated().await {
            Ok(conn) => {
                let listing = (conn.redis_id() != 0)
                    .then(|| self.ctx.directory.list(self.id, conn.redis_id()));
                self.pin = Some(Pin {
                    _listing: listing,
                    conn,
                    relay: false,
                    in_multi: false,
                    watching: false,
                    dirty: false,
                    txn_inv: Invalidation::default(),
                    txn_queued: 0,
                    txn_local: Vec::new(),
                });
                true
            }
            Err(e) => {
                self.reply(e.to_reply());
                false
            }
        }
    }

    /// `CLIENT TRACKING … REDIRECT <id>`: the id is nearcache's (what the
    /// other client's `CLIENT ID` answered); Redis needs its own id for the
    /// connection that client is pinned to. `Ok(true)`: `argv` now carries
    /// it; `Ok(false)`: nothing to translate (Redis judges the syntax);
    /// `Err`: no such client is pinned, Redis's own error for an unknown id.
    pub(super) fn redirect_to_redis_id(&mut self) -> Result<bool, Bytes> {
        let mut i = 3;
        while i + 1 < self.argv.len() {
            let opt = &self.argv[i];
            if opt.eq_ignore_ascii_case(b"redirect") {
                let Some(client) = parse_i64(&self.argv[i + 1]) else {
                    return Ok(false);
                };
                let Some(id) = u64::try_from(client)
                    .ok()
                    .and_then(|c| self.ctx.directory.redis_id(c))
                else {
                    return Err(reply::error(
                        "ERR The client ID you want redirect to does not exist",
                    ));
                };
                self.argv[i + 1] = Bytes::from(id.to_string());
                return Ok(true);
            }
            // PREFIX takes a value (which may read "redirect"); flags do not.
            i += if opt.eq_ignore_ascii_case(b"prefix") {
                2
            } else {
                1
            };
        }
        Ok(false)
    }

    /// Releases the pin once no transaction state is left on it.
    pub(super) async fn maybe_unpin(&mut self, chunk: &Bytes) {
        let done = self
            .pin
            .as_ref()
            .is_some_and(|p| !p.relay && !p.in_multi && !p.watching);
        if !done {
            return;
        }
        self.flush_run(chunk).await;
        if let Some(pin) = self.pin.take() {
            if pin.dirty {
                self.settle(pin).await;
            } else {
                let _ = pin.conn.send(Op::Release(pin.conn.clone()));
            }
        }
    }

    /// Sends the current command on the pinned connection and waits for its
    /// reply (for the rare commands whose outcome decides how the session
    /// goes on). The commands before it are already on their way.
    pub(super) async fn ask_pinned(&mut self, chunk: &Bytes, frame: Option<Range<usize>>) -> Bytes {
        let frames = match frame {
            Some(f) => chunk.slice(f),
            None => encode_command(&self.argv),
        };
        let lost = || UpstreamError::ConnectionLost.to_reply();
        self.order_for_pin().await;
        let Some(conn) = self.pin.as_ref().map(|p| p.conn.clone()) else {
            return lost();
        };
        if conn.is_closed() {
            self.pin = None;
            return lost();
        }
        match conn.ask(frames).await {
            Ok(reply) => reply,
            Err(failed) => failed.error.to_reply(),
        }
    }

    /// EXEC of a transaction that queued commands nearcache answers itself:
    /// once Redis's reply is in (so their effects precede what follows), runs
    /// them in order and splices their replies into EXEC's array. If the
    /// transaction did not run (a WATCH fired, EXECABORT), neither do they.
    pub(super) async fn exec_local(&mut self, local: Vec<(u32, Route, Vec<Bytes>)>) {
        let Some(Ok(reply)) = self.out.last_replies().await else {
            return;
        };
        // (The slot is answered whatever happens: its receiver is spent.)
        let Some((spliced, unmuted_at)) = self.splice_exec(&reply, local).await else {
            self.out.answer_last(Ok(reply));
            return;
        };
        self.out.answer_last(Ok(spliced.clone()));
        if let Some(at) = unmuted_at {
            // A CLIENT REPLY ON queued under OFF: Redis drops EXEC's reply
            // up to it, then sends its +OK and the elements after it.
            self.push(Slot::Mute(false));
            self.reply(spliced.slice(at..));
        }
    }

    /// Queues a command nearcache answers itself inside MULTI (Redis would
    /// queue it): it runs at EXEC, answered in its place in EXEC's reply.
    pub(super) fn queue_local(&mut self, route: Route) {
        if let Some(pin) = &mut self.pin {
            pin.txn_local
                .push((pin.txn_queued, route, std::mem::take(&mut self.argv)));
        }
        self.reply(Bytes::from_static(b"+QUEUED\r\n"));
    }

    /// EXEC's reply with the replies of the commands nearcache queued
    /// itself spliced in; and, if one of them turned replies back on, where
    /// its reply starts.
    pub(super) async fn splice_exec(
        &mut self,
        exec: &Bytes,
        local: Vec<(u32, Route, Vec<Bytes>)>,
    ) -> Option<(Bytes, Option<usize>)> {
        let header_end = exec.iter().position(|&b| b == b'\n')? + 1;
        if exec.first() != Some(&b'*') {
            return None;
        }
        let n = usize::try_from(parse_i64(&exec[1..header_end - 2])?).ok()?;
        let mut elements = Vec::with_capacity(n);
        let mut at = header_end;
        for _ in 0..n {
            let len = ReplyScanner::new().scan(&exec[at..]).ok()??;
            elements.push(at..at + len);
            at += len;
        }
        let mut out = BytesMut::with_capacity(exec.len() + 64 * local.len());
        out.extend_from_slice(format!("*{}\r\n", n + local.len()).as_bytes());
        let mut next = 0;
        let mut unmuted_at = None;
        let saved = std::mem::take(&mut self.argv);
        for (before, route, argv) in local {
            // (Positions only grow: each local command came after the last.)
            let upto = (before as usize).clamp(next, n);
            for e in &elements[next..upto] {
                out.extend_from_slice(&exec[e.clone()]);
            }
            next = upto;
            self.argv = argv;
            let was_off = self.reply_off;
            let r = self.local_reply(route).await;
            if was_off && !self.reply_off {
                unmuted_at.get_or_insert(out.len());
            }
            out.extend_from_slice(&r);
        }
        self.argv = saved;
        for e in &elements[next..] {
            out.extend_from_slice(&exec[e.clone()]);
        }
        Some((out.freeze(), unmuted_at))
    }

    /// Leaves a pinned connection whose database or protocol changed while
    /// pinned (SELECT or HELLO, perhaps inside a transaction that may or may
    /// not have run them): asks it where it ended up (`CLIENT INFO`'s `db=`
    /// and `resp=`) and moves the session to the shared connections of that
    /// database and protocol, as the client expects. The connection then
    /// closes, once its last replies are delivered.
    pub(super) async fn settle(&mut self, pin: Pin) {
        let info = pin
            .conn
            .ask(encode_command(&[&b"CLIENT"[..], b"INFO"]))
            .await;
        drop(pin);
        let (mut db, mut proto) = (self.db, self.proto);
        if let Ok(info) = info {
            if let Some(n) = info_field(&info, b"db=").and_then(|n| u32::try_from(n).ok()) {
                db = n;
            }
            match info_field(&info, b"resp=") {
                Some(2) => proto = Protocol::Resp2,
                Some(3) => proto = Protocol::Resp3,
                _ => {}
            }
        }
        if let Err(e) = self.switch_pool(db, proto).await {
            // (Redis just accepted that database on the pin, so this is not
            // expected.) The session stays where its commands will go, so its
            // invalidations name the database its writes land in.
            tracing::warn!(db, error = %e, "no shared connection for the database a pin left");
            let key = self.pool.key();
            (self.db, self.proto) = (key.db, key.proto);
        }
    }

    /// Inside MULTI, a command after which replies would stop pairing with
    /// commands (SUBSCRIBE…, MONITOR, CLIENT TRACKING ON, CLIENT REPLY):
    /// Redis would queue it and switch at EXEC, in the middle of EXEC's
    /// reply, which nearcache cannot follow. It is refused, and Redis is made
    /// to abort the transaction at EXEC, as for any command refused while
    /// queuing (an arity error, whose reply nobody reads).
    pub(super) fn refuse_in_multi(&mut self, spec: Option<&CommandSpec>) {
        if let Some(pin) = &self.pin {
            let (poison, _unread) = Op::request(encode_command(&["GET"]), 1, false);
            let _ = pin.conn.send(poison);
        }
        let name = spec.map_or("", |s| s.name);
        self.reply(reply::error(&format!(
            "ERR '{name}' inside MULTI is not supported by nearcache"
        )));
    }

    /// Switches to relay mode with the current command as the first relayed one.
    pub(super) async fn start_relay(&mut self, chunk: &Bytes, frame: Option<Range<usize>>) {
        self.flush_run(chunk).await;
        if self.pin.is_none() && !self.pin_dedicated().await {
            return;
        }
        let mut frames = match frame {
            Some(f) => chunk.slice(f),
            None => encode_command(&self.argv),
        };
        // Replies dropped here so far are Redis's to drop from now on (it
        // tells them from the pushes it must still send).
        let mode = if self.reply_off {
            Some("OFF")
        } else if self.skipping {
            Some("SKIP")
        } else {
            None
        };
        if let Some(mode) = mode {
            frames = [&encode_command(&["CLIENT", "REPLY", mode])[..], &frames[..]]
                .concat()
                .into();
            self.push(Slot::Mute(false));
            self.reply_off = false;
        }
        let (tx, rx) = mpsc::channel(1024);
        self.order_for_pin().await;
        // (Replies are counted from here, where they can be: see `Op::Ack`.)
        let replies = if mode.is_some() {
            None
        } else {
            let maybe_subscribed = self.proto == Protocol::Resp2 && self.enrollment.pubsub();
            super::relay_replies(&self.argv, maybe_subscribed, false)
        };
        // (A relay that went before has its writes published.)
        self.relay.multi = false;
        self.ack_relayed(chunk).await;
        self.relay = super::RelayBook {
            countable: replies.is_some(),
            ..Default::default()
        };
        let Some(pin) = &mut self.pin else { return };
        if pin
            .conn
            .send(Op::Relay {
                frames,
                tx,
                replies,
            })
            .is_err()
        {
            self.pin = None;
            return self.reply(UpstreamError::ConnectionLost.to_reply());
        }
        pin.relay = true;
        pin.dirty = true;
        self.push(Slot::Relay(rx));
        self.note_subscribe();
    }
}

/// A numeric `name=` field of a `CLIENT INFO` reply (` db=0 `).
pub(super) fn info_field(info: &[u8], name: &[u8]) -> Option<i64> {
    let at = info
        .windows(name.len() + 1)
        .position(|w| w[0] == b' ' && &w[1..] == name)?;
    let rest = &info[at + 1 + name.len()..];
    let end = rest
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len());
    parse_i64(&rest[..end])
}

/// Where WAIT's preliminary write goes (see `Session::wait`).
pub(super) const WAIT_CHANNEL: &[u8] = b"__nearcache:wait";

/// The rest of `Session::wait`: once `barrier` answers, sends `frames`
/// (PUBLISH, then WAIT) on a dedicated connection and returns WAIT's reply.
/// Gives up, closing that connection, if the client stops waiting.
pub(super) async fn wait_after(
    barrier: oneshot::Receiver<Replies>,
    pool: Arc<Pool>,
    frames: Bytes,
    client: &mut oneshot::Sender<Replies>,
) -> Replies {
    let lost = Failed::nothing;
    tokio::select! {
        r = barrier => match r {
            Ok(Ok(_)) => {}
            Ok(Err(failed)) => return Err(lost(failed.error)),
            Err(_) => return Err(lost(UpstreamError::ConnectionLost)),
        },
        _ = client.closed() => return Err(lost(UpstreamError::ConnectionLost)),
    }
    let conn = pool.dedicated().await.map_err(lost)?;
    let (tx, rx) = oneshot::channel();
    conn.send(Op::Send {
        frames,
        replies: 2,
        blocking: true,
        tx,
    })
    .map_err(|_| lost(UpstreamError::ConnectionLost))?;
    let _ = conn.send(Op::Release(conn.clone()));
    // Dropping `rx` when the client leaves tells the connection nobody
    // waits, and it closes (Redis drops a disconnected client's WAIT too).
    let replies = tokio::select! {
        r = rx => r.unwrap_or_else(|_| Err(lost(UpstreamError::ConnectionLost)))?,
        _ = client.closed() => return Err(lost(UpstreamError::ConnectionLost)),
    };
    // Skip PUBLISH's reply (a count, or an error such as an ACL refusal:
    // WAIT then counts acks as a fresh connection would, and still answers).
    match ReplyScanner::new().scan(&replies) {
        Ok(Some(len)) => Ok(replies.slice(len..)),
        _ => Err(lost(UpstreamError::InvalidReply)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_field_reads_numbers_from_client_info_in_either_protocol() {
        let resp2 = b"$80\r\nid=7 addr=127.0.0.1:5 laddr=127.0.0.1:6379 fd=8 name=nearcache db=3 sub=0 resp=2\n\r\n";
        assert_eq!(info_field(resp2, b"db="), Some(3));
        assert_eq!(info_field(resp2, b"resp="), Some(2));
        assert_eq!(info_field(resp2, b"fd="), Some(8));
        let resp3 = b"=40\r\ntxt:id=7 db=12 multi=-1 resp=3\n\r\n";
        assert_eq!(info_field(resp3, b"db="), Some(12));
        assert_eq!(info_field(resp3, b"resp="), Some(3));
        // A field name inside another's (`laddr=` holds `addr=`) or absent.
        assert_eq!(info_field(b"$9\r\nladdr=1 x\r\n", b"addr="), None);
        assert_eq!(info_field(resp3, b"qbuf="), None);
    }
}
