//! Commands that may block their client (`BLPOP`…, `XREAD … BLOCK`, `WAIT`):
//! on a shared connection they would hold every other client's commands
//! behind them, so each runs on a dedicated connection of its own, borrowed
//! for that one command; the session's input waits for its answer, as Redis
//! holds a blocked client's input.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use super::{Request, Session};
use crate::protocol::ReplyScanner;
use crate::server::outbox::Slot;
use crate::stats::Path;
use crate::upstream::connection::Failed;
use crate::upstream::{Op, Pool, Replies, UpstreamError, encode_command};

/// Where WAIT's preliminary write goes (see `Session::wait`).
const WAIT_CHANNEL: &[u8] = b"__nearcache:wait";

impl Session {
    /// Queues the slot of a command that may block, answered on `rx` by the
    /// task that runs it (with the keys it writes).
    fn push_blocking(&mut self, rx: oneshot::Receiver<Replies>) {
        let inv = std::mem::take(&mut self.batch.pending_inv);
        self.out.push(Slot::Upstream {
            decode: None,
            rx,
            count: 1,
            blocking: true,
            inv,
            timing: self.timing(Path::Blocking, ""),
        });
    }

    /// A command that may block, while pinned: alone on the pinned
    /// connection, so its slot can be abandoned without the others. (A WAIT
    /// counts acks for the pinned connection's writes, which are this
    /// client's: the right place for it.)
    pub(super) async fn blocking_pinned(&mut self, req: &Request<'_>) {
        self.flush_run().await;
        if let super::Mode::Transaction(_, txn) = &mut self.mode {
            txn.queued += 1;
        }
        let inv = std::mem::take(&mut self.batch.pending_inv);
        self.send_pinned(req.bytes(), 1, true, inv, req.name())
            .await;
    }

    /// Runs a blocking command on a dedicated connection that goes back to the
    /// idle list once it answers (or is closed if the client leaves first).
    pub(super) async fn blocking(&mut self, req: &Request<'_>) {
        self.flush_run().await;
        let conn = match self.lane.dedicated().await {
            Ok(conn) => conn,
            Err(e) => return self.fail(&e, 1),
        };
        self.lane.order_for(&conn, &mut self.out).await;
        let (op, rx) = Op::request(req.bytes(), 1, true);
        // While blocked, `CLIENT UNBLOCK <this client's id>` finds it here.
        let listing = (conn.redis_id() != 0)
            .then(|| self.ctx.directory.list(self.client.id, conn.redis_id()));
        if conn.send(op).is_err() {
            return self.fail(&UpstreamError::ConnectionLost, 1);
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
    pub(super) async fn wait(&mut self, req: &Request<'_>) {
        self.flush_run().await;
        let mut frames = BytesMut::from(&encode_command(&[&b"PUBLISH"[..], WAIT_CHANNEL, b""])[..]);
        frames.extend_from_slice(&req.bytes());
        let (barrier_op, barrier) = Op::request(encode_command(&[&b"PING"[..]]), 1, false);
        if let Err(e) = self.lane.send_shared(barrier_op, &mut self.out).await {
            return self.fail(&e, 1);
        }
        let pool = self.lane.pool().clone();
        let (mut client_tx, client_rx) = oneshot::channel();
        tokio::spawn(async move {
            let reply = wait_after(barrier, pool, frames.freeze(), &mut client_tx).await;
            let _ = client_tx.send(reply);
        });
        self.push_blocking(client_rx);
    }
}

/// The rest of `Session::wait`: once `barrier` answers, sends `frames`
/// (PUBLISH, then WAIT) on a dedicated connection and returns WAIT's reply.
/// Gives up, closing that connection, if the client stops waiting.
async fn wait_after(
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
    let (op, rx) = Op::request(frames, 2, true);
    conn.send(op)
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
