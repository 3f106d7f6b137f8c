//! `WATCH` and `MULTI` … `EXEC`: the session is pinned to a dedicated
//! connection while Redis holds the state; what nearcache answers itself is
//! queued as Redis would queue it and answered at `EXEC`, spliced into its
//! reply; the pin is let go once the transaction and its watches end.

use bytes::{Bytes, BytesMut};

use super::mode::{Mode, Pin, Queued, Txn};
use super::{Flow, Request, Session, local};
use crate::error::ProxyError;
use crate::protocol::ReplyScanner;
use crate::protocol::parser::parse_i64;
use crate::protocol::reply::Protocol;
use crate::server::outbox::Slot;
use crate::server::route::Route;
use crate::upstream::{Op, PoolKey, encode_command};

impl Session {
    /// Handles a command inside MULTI; what needs no care of its own goes as
    /// in [`Session::paired`].
    pub(super) async fn queued(&mut self, req: &mut Request<'_>) -> Flow {
        match req.route {
            // Redis queues these and runs them at EXEC: so does nearcache.
            route if route.answered_locally() => self.queue_local(req),
            // ON (or a bad mode, a syntax error) runs at EXEC (see
            // `local_reply`); OFF and SKIP would turn replies off in the
            // middle of EXEC's, as Redis does, and are refused.
            Route::ClientReply
                if !matches!(
                    local::reply_mode(&req.argv),
                    Some(local::ReplyMode::Off | local::ReplyMode::Skip)
                ) =>
            {
                self.queue_local(req)
            }
            // Redis would switch the connection in the middle of EXEC's
            // reply, which nearcache cannot follow.
            Route::ClientReply | Route::Relay => {
                let e = format!(
                    "ERR '{}' inside MULTI is not supported by nearcache",
                    req.name()
                );
                self.refuse(ProxyError::unsupported(e)).await;
            }
            // Redis must see it: a queuing error makes EXEC fail with
            // EXECABORT, and answering here would let the rest commit.
            Route::WrongArity(_) => self.forward(req).await,
            // Queued by Redis and answered in EXEC's reply, as Redis's own
            // (see `info.rs`).
            Route::Info => self.forward(req).await,
            _ => return self.paired(req).await,
        }
        Flow::Continue
    }

    /// `MULTI` or `WATCH`: pins a dedicated connection (on failure the
    /// client has its error reply), then forwards it there. A nested MULTI,
    /// or WATCH inside MULTI, is Redis's error; the transaction stands.
    pub(super) async fn begin_transaction(&mut self, req: &Request<'_>) {
        if !self.mode.pinned() && !self.pin_dedicated().await {
            return;
        }
        // Forwarded first: MULTI itself is not one of the commands the
        // transaction queues.
        self.forward(req).await;
        self.mode = match (std::mem::replace(&mut self.mode, Mode::Shared), req.route) {
            (Mode::Pinned(pin), Route::Multi) => Mode::Transaction(pin, Txn::default()),
            (mode, _) => mode,
        };
    }

    /// `EXEC`, `DISCARD` or `UNWATCH`. Outside a pin, Redis gives its own
    /// error.
    pub(super) async fn end_transaction(&mut self, req: &Request<'_>) -> Flow {
        let mut local = Vec::new();
        let mut decode = Vec::new();
        let ends = match (std::mem::replace(&mut self.mode, Mode::Shared), req.route) {
            // The transaction and its watches end (and EXEC itself is not
            // queued).
            (Mode::Transaction(pin, txn), Route::EndTransaction) => {
                if req.name() == "exec" {
                    self.exec_writes(txn.inv);
                    local = txn.local;
                    decode = txn.decode;
                }
                self.mode = Mode::Pinned(pin);
                true
            }
            (Mode::Pinned(pin), Route::Unwatch) => {
                self.mode = Mode::Pinned(pin);
                true
            }
            // Queued (UNWATCH in MULTI), or Redis's error (EXEC without
            // MULTI, which leaves the watches standing).
            (mode, _) => {
                self.mode = mode;
                false
            }
        };
        self.forward(req).await;
        if !decode.is_empty() {
            // EXEC goes alone (it is not one of the commands that join a
            // run): its slot is the last one. Decoded before the commands
            // nearcache queued itself are spliced in, where the positions
            // are still Redis's.
            self.flush_run().await;
            if let Some(replies) = self.out.last_replies().await {
                self.out
                    .answer_last(crate::stored::decode_exec_replies(replies, &decode));
            }
        }
        if !local.is_empty() {
            self.flush_run().await;
            self.exec_local(local).await;
            if self.client.closing {
                return self.close();
            }
        }
        if ends {
            self.unpin().await;
        }
        Flow::Continue
    }

    /// An `EXEC` refused at admission (NOPERM, NOAUTH, a limit): Redis
    /// discards the transaction, so nearcache must not leave it open, or the
    /// client's next commands would be queued in it. Outside MULTI the
    /// refusal reads as Redis's; inside, the transaction is failed upstream
    /// (Redis answers its own EXECABORT) and the pin ends as after any EXEC.
    pub(super) async fn refuse_exec(&mut self, req: &Request<'_>, e: ProxyError) -> Flow {
        if !matches!(self.mode, Mode::Transaction(..)) {
            self.refuse(e.exec_abort()).await;
            return Flow::Continue;
        }
        self.ctx.stats.requests.error(e.kind(), 1);
        self.flush_run().await;
        if let Mode::Transaction(pin, _) = &self.mode {
            super::deliver::abort_at_exec(&pin.conn);
        }
        self.end_transaction(req).await
    }

    /// Pins a dedicated connection ([`Mode::Pinned`]); on failure the client
    /// has its error reply.
    pub(super) async fn pin_dedicated(&mut self) -> bool {
        match self.lane.dedicated().await {
            Ok(conn) => {
                let listing = (conn.redis_id() != 0)
                    .then(|| self.ctx.directory.list(self.client.id, conn.redis_id()));
                self.mode = Mode::Pinned(Pin {
                    _listing: listing,
                    conn,
                    dirty: false,
                });
                true
            }
            Err(e) => {
                self.fail(&e, 1);
                false
            }
        }
    }

    /// Pins the connection held for this client (another client named it
    /// as its tracking redirect), if one is and it is on the client's
    /// database and protocol: its invalidations arrive there.
    pub(super) fn pin_held(&mut self) -> bool {
        let Some(held) = self.ctx.directory.take_reserved(self.client.id) else {
            return false;
        };
        let fits = (held.db, held.proto) == (self.client.db, self.client.proto)
            && self.client.user.is_none()
            && !held.conn.is_closed();
        if !fits {
            return false;
        }
        let listing = self
            .ctx
            .directory
            .list(self.client.id, held.conn.redis_id());
        self.mode = Mode::Pinned(Pin {
            _listing: Some(listing),
            conn: held.conn,
            dirty: false,
        });
        true
    }

    /// Lets the pin go: back to its pool's idle list, or closed and the
    /// session moved to where it ended up if its state changed.
    async fn unpin(&mut self) {
        self.flush_run().await;
        if let Some(pin) = self.mode.unpin() {
            if pin.dirty {
                self.settle(pin).await;
            } else {
                let _ = pin.conn.send(Op::Release(pin.conn.clone()));
            }
        }
    }

    /// Queues a command nearcache answers itself inside MULTI (Redis would
    /// queue it): it runs at EXEC, answered in its place in EXEC's reply.
    fn queue_local(&mut self, req: &mut Request<'_>) {
        if let Mode::Transaction(_, txn) = &mut self.mode {
            txn.local.push(Queued {
                after: txn.queued,
                route: req.route,
                argv: std::mem::take(&mut req.argv),
            });
        }
        self.out.put_bytes(Bytes::from_static(b"+QUEUED\r\n"));
    }

    /// EXEC of a transaction that queued commands nearcache answers itself:
    /// once Redis's reply is in (so their effects precede what follows), runs
    /// them in order and splices their replies into EXEC's array. If the
    /// transaction did not run (a WATCH fired, EXECABORT), neither do they.
    async fn exec_local(&mut self, local: Vec<Queued>) {
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
            self.out.push(Slot::Mute(false));
            self.out.put_bytes(spliced.slice(at..));
        }
    }

    /// EXEC's reply with the replies of the commands nearcache queued
    /// itself spliced in; and, if one of them turned replies back on, where
    /// its reply starts.
    async fn splice_exec(
        &mut self,
        exec: &Bytes,
        local: Vec<Queued>,
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
        for queued in local {
            // (Positions only grow: each local command came after the last.)
            let upto = (queued.after as usize).clamp(next, n);
            for e in &elements[next..upto] {
                out.extend_from_slice(&exec[e.clone()]);
            }
            next = upto;
            let was_off = self.muting.off;
            let r = self.local_reply(queued.route, &queued.argv).await;
            if was_off && !self.muting.off {
                unmuted_at.get_or_insert(out.len());
            }
            out.extend_from_slice(&r);
        }
        for e in &elements[next..] {
            out.extend_from_slice(&exec[e.clone()]);
        }
        Some((out.freeze(), unmuted_at))
    }

    /// Sends the current command on the pinned connection and waits for its
    /// reply (for the rare commands whose outcome decides how the session
    /// goes on). The commands before it are already on their way.
    pub(super) async fn ask_pinned(&mut self, req: &Request<'_>) -> Bytes {
        let lost = || crate::upstream::UpstreamError::ConnectionLost.to_reply();
        let Some(conn) = self.mode.pin().map(|p| p.conn.clone()) else {
            return lost();
        };
        self.lane.order_for(&conn, &mut self.out).await;
        if conn.is_closed() {
            self.mode = Mode::Shared;
            return lost();
        }
        match conn.ask(req.bytes()).await {
            Ok(reply) => reply,
            Err(failed) => failed.error.to_reply(),
        }
    }

    /// Leaves a pinned connection whose database or protocol changed while
    /// pinned (SELECT or HELLO, perhaps inside a transaction that may or may
    /// not have run them): asks it where it ended up (`CLIENT INFO`'s `db=`
    /// and `resp=`) and moves the session to the shared connections of that
    /// database and protocol, as the client expects. The connection then
    /// closes, once its last replies are delivered.
    async fn settle(&mut self, pin: Pin) {
        let info = pin
            .conn
            .ask(encode_command(&[&b"CLIENT"[..], b"INFO"]))
            .await;
        drop(pin);
        let (mut db, mut proto) = (self.client.db, self.client.proto);
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
        if let Err(e) = self.switch(db, proto).await {
            // (Redis just accepted that database on the pin, so this is not
            // expected.) The session stays where its commands will go, so its
            // invalidations name the database its writes land in.
            tracing::warn!(db, error = %e, "no shared connection for the database a pin left");
            let PoolKey { db, proto, .. } = *self.lane.key();
            (self.client.db, self.client.proto) = (db, proto);
        }
    }
}

/// A numeric `name=` field of a `CLIENT INFO` reply (` db=0 `).
fn info_field(info: &[u8], name: &[u8]) -> Option<i64> {
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
