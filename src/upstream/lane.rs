//! A session's way to Redis: which pool it is on, the shared connection it
//! sticks to, and the order of its commands across connections.
//!
//! Redis runs each connection's commands in order, and nothing orders two
//! connections. A client's commands all arrive on one connection to
//! nearcache, so whenever they move to another upstream connection (a pinned
//! one for MULTI, a dedicated one for a blocking command, another database's
//! pool), the replies still due on the connection they leave must come in
//! first: then a `GET` pipelined behind `EXEC` sees the transaction's writes,
//! and a `SET` before `SELECT 1` lands in the database it was sent in. The
//! lane keeps the last connection it sent on, and [`Lane::order_for`] waits
//! for the outbox's replies when the next send goes elsewhere.
//!
//! This is the seam an upstream other than one standalone Redis plugs into
//! (a pool per Redis user, a Sentinel-discovered master, Redis Cluster slot
//! routing): the session asks the lane for connections and never picks one
//! itself.

use std::sync::Arc;

use super::{Conn, Op, Pool, PoolKey, Upstream, UpstreamError};
use crate::server::outbox::Outbox;

/// A session's upstream: its pool, sticky shared connection and ordering.
#[derive(Debug)]
pub struct Lane {
    upstream: Arc<Upstream>,
    pool: Arc<Pool>,
    /// The shared connection this session pipelines through (sticky, so a
    /// client's commands stay ordered relative to each other).
    conn: Option<Conn>,
    /// The pool's scripts' connection (see [`Lane::send_script`]), while the
    /// session's last sends went there.
    script: Option<Conn>,
    /// The [serial](Conn::serial) of the connection last sent to.
    last: u64,
}

impl Lane {
    /// A lane on `pool` of `upstream`.
    pub fn new(upstream: Arc<Upstream>, pool: Arc<Pool>) -> Self {
        Self {
            upstream,
            pool,
            conn: None,
            script: None,
            last: 0,
        }
    }

    /// The database, protocol and user of the pool in use.
    pub fn key(&self) -> &PoolKey {
        self.pool.key()
    }

    /// The pool in use (for requests that need no ordering with the
    /// session's own, such as `CLIENT LIST`'s question to Redis).
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Moves to the pool for `key` (another database or protocol). Fails
    /// when Redis rejects that setup, e.g. a database out of range; the lane
    /// then stays where it was.
    pub async fn switch(&mut self, key: PoolKey) -> Result<(), UpstreamError> {
        if *self.pool.key() != key {
            self.pool = self.upstream.pool(key).await?;
            // (The scripts' connection is the old pool's too.)
            self.conn = None;
            self.script = None;
        }
        Ok(())
    }

    /// Back on `pool` (RESET), with no sticky connection.
    pub fn reset(&mut self, pool: Arc<Pool>) {
        self.pool = pool;
        self.conn = None;
        self.script = None;
    }

    /// Called before sending on `conn`: when the session last sent on
    /// another connection, waits until the replies due there have arrived
    /// (they are written to the client later, in order, as usual).
    pub async fn order_for(&mut self, conn: &Conn, out: &mut Outbox) {
        let serial = conn.serial();
        if self.last != serial {
            if out.awaits_upstream() {
                out.settle_upstream().await;
            }
            self.last = serial;
            if self.script.as_ref().is_some_and(|s| s.serial() != serial) {
                self.script = None;
            }
        }
    }

    /// Sends `op` (scripts or functions) on the pool's scripts' connection
    /// (see [`Pool::scripts`]), ordered after the session's earlier sends.
    /// The session's commands that follow go there too while replies are
    /// due (see [`Lane::send_shared`]), so a pipeline mixing scripts and
    /// other commands keeps its order without waiting.
    pub async fn send_script(&mut self, mut op: Op, out: &mut Outbox) -> Result<(), UpstreamError> {
        self.admit(&mut op).await?;
        let conn = match self
            .script
            .as_ref()
            .filter(|c| !c.is_closed() && self.upstream.is_current(c))
        {
            Some(conn) => conn.clone(),
            None => self.pool.scripts().await?,
        };
        self.order_for(&conn, out).await;
        self.script = Some(conn.clone());
        conn.send(op).map_err(|_| {
            self.script = None;
            UpstreamError::ConnectionLost
        })
    }

    /// Sends `op` on the sticky shared connection, ordered after the
    /// session's earlier sends; if that connection died, on one fresh one.
    pub async fn send_shared(&mut self, mut op: Op, out: &mut Outbox) -> Result<(), UpstreamError> {
        self.admit(&mut op).await?;
        // Behind scripts whose replies are due: on their connection, which
        // keeps the order with no wait.
        if let Some(script) = self.script.as_ref().filter(|c| !c.is_closed()) {
            if out.awaits_upstream() {
                return script.send(op).map_err(|_| UpstreamError::ConnectionLost);
            }
        }
        for _ in 0..2 {
            let conn = match self
                .conn
                .as_ref()
                .filter(|c| !c.is_closed() && self.upstream.is_current(c))
            {
                Some(conn) => conn.clone(),
                None => {
                    let conn = self.pool.shared().await?;
                    self.conn = Some(conn.clone());
                    conn
                }
            };
            self.order_for(&conn, out).await;
            match conn.send(op) {
                Ok(()) => return Ok(()),
                Err(back) => {
                    op = back;
                    self.conn = None;
                }
            }
        }
        Err(UpstreamError::ConnectionLost)
    }

    /// Takes room for `op` in the upstream's [backlog](super::backlog),
    /// waiting for it up to `command_timeout` (only this session waits).
    /// Every request the session sends takes room, except a blocking
    /// command's, which may wait for as long as its client does.
    pub async fn admit(&self, op: &mut Op) -> Result<(), UpstreamError> {
        if let Some((commands, bytes)) = op.weight() {
            op.hold(self.upstream.backlog.admit(commands, bytes).await?);
        }
        Ok(())
    }

    /// A dedicated connection (a pin, a blocking command): an idle one of
    /// the pool or a new one.
    pub async fn dedicated(&self) -> Result<Conn, UpstreamError> {
        self.pool.dedicated().await
    }
}
