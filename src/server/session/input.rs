//! A client's input: parsing what a read delivered into commands (bounded,
//! incremental) and handing them to the session, holding back what follows
//! a command that may block.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use super::{Flow, Session};
use crate::error::ProxyError;
use crate::protocol::{Limits, Parsed, Parser};
use crate::server::outbox::Slot;
use crate::server::route::may_block;

/// One parsed command of the current read.
pub(super) enum Cmd {
    /// A RESP command: its frame and argument ranges in the read chunk.
    Resp {
        frame: Range<usize>,
        args: Range<usize>,
    },
    /// An inline command, already split.
    Inline(Vec<Bytes>),
}

/// Why complete commands were left in the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Backlog {
    /// None were.
    None,
    /// The reply budget ran out.
    Full,
    /// A command that may block is next, or was just sent: see `held` in
    /// `serve`.
    Blocking,
}

/// How much input a session held behind a blocking command still reads.
const HELD_INPUT_LIMIT: usize = 1 << 20;

/// A client's unparsed input and the per-read scratch vectors (reused, so a
/// read allocates nothing).
pub(super) struct Input {
    parser: Parser,
    pub(super) buf: BytesMut,
    cmds: Vec<Cmd>,
    ranges: Vec<Range<usize>>,
}

impl Input {
    pub(super) fn new(limits: Limits) -> Self {
        Self {
            parser: Parser::new(limits),
            buf: BytesMut::with_capacity(16 * 1024),
            cmds: Vec::new(),
            ranges: Vec::new(),
        }
    }

    /// Whether a session held behind a blocking command may read more.
    pub(super) fn has_room(&self) -> bool {
        self.buf.len() < HELD_INPUT_LIMIT
    }

    /// Makes room for the next read (as much as a partial frame wants).
    pub(super) fn reserve(&mut self) {
        let wanted = self.parser.bytes_wanted(self.buf.len());
        self.buf.reserve(wanted.max(4096));
    }

    /// Parses up to `room` commands from the buffer and runs them through the
    /// session, stopping before a command that may block unless every earlier
    /// reply is in, and right after it. `Ok(backlog)`: whether complete
    /// commands remain, and why; `Err(())`: the client is finished (protocol
    /// error or QUIT).
    pub(super) async fn dispatch(
        &mut self,
        session: &mut Session,
        room: usize,
    ) -> Result<Backlog, ()> {
        self.cmds.clear();
        self.ranges.clear();
        let mut consumed = 0;
        let mut error = None;
        let mut backlog = Backlog::None;
        loop {
            if self.cmds.len() >= room {
                backlog = Backlog::Full;
                break;
            }
            match self.parser.next(&self.buf) {
                Ok(Some(parsed)) => {
                    let blocks = match &parsed {
                        Parsed::Resp { .. } => {
                            let args = self.parser.args();
                            may_block(
                                &self.buf[args[0].clone()],
                                args[1..].iter().map(|r| &self.buf[r.clone()]),
                            )
                        }
                        Parsed::Inline { args, .. } => args
                            .first()
                            .is_some_and(|name| may_block(name, args[1..].iter().map(|a| &a[..]))),
                        Parsed::Empty { .. } => false,
                    };
                    if blocks {
                        backlog = Backlog::Blocking;
                        if !self.cmds.is_empty() || session.out.awaits_upstream() {
                            self.parser.unread(parsed.frame().start);
                            break;
                        }
                    }
                    consumed = parsed.frame().end;
                    match parsed {
                        Parsed::Resp { frame } => {
                            let first = self.ranges.len();
                            self.ranges.extend_from_slice(self.parser.args());
                            self.cmds.push(Cmd::Resp {
                                frame,
                                args: first..self.ranges.len(),
                            });
                        }
                        Parsed::Inline { args, .. } => self.cmds.push(Cmd::Inline(args)),
                        Parsed::Empty { .. } => {}
                    }
                    if blocks {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let chunk = self.buf.split_to(consumed).freeze();
        self.parser.consume(consumed);
        let flow = session.process(&chunk, &self.cmds, &self.ranges).await;
        if let Some(e) = error {
            tracing::debug!(client = session.client.id, error = %e, "protocol error; closing");
            let e = ProxyError::from(e);
            session.ctx.stats.requests.error(e.kind(), 1);
            session.out.put_bytes(e.to_reply());
            session.out.push(Slot::Close);
            return Err(());
        }
        if flow == Flow::Stop {
            return Err(());
        }
        Ok(backlog)
    }
}

/// Resolves once the server asks sessions to stop.
pub(super) async fn shutdown_requested(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            // The server is gone without a signal: nothing to wait for.
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves when the client has been idle too long (never when disabled).
pub(super) async fn idle_expired(idle: std::time::Duration) {
    if idle.is_zero() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(idle).await;
}
