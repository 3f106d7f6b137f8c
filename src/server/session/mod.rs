//! One client connection: read commands, route each, queue its reply slot.
//!
//! The request path, in order, for every command of a read (`Session::handle`):
//! 1. **parse** (bounded, incremental) — a protocol error answers and closes;
//! 2. **classify** ([`route`](super::route)) — forward, answer locally, or pin;
//! 3. **invalidate** — a write's keys leave L1 now and again on its reply
//!    (`cached.rs`);
//! 4. **lookup** — a cacheable read is answered from L1, or fetched once for
//!    every client waiting on it and filled (`cached.rs`);
//! 5. **forward** — consecutive forwarded commands of one read go upstream as
//!    one run: one message to the connection task, the client's own bytes
//!    untouched, one reply slot for all of them;
//! 6. **respond** — the [`outbox`](super::outbox) writes slots in order, as
//!    many as are ready in one write.
//!
//! Connection state that Redis keeps per connection is kept here instead
//! (database, protocol, name, authentication) so that shared upstream
//! connections stay stateless; state that only Redis can keep (MULTI, WATCH,
//! subscriptions, a blocked command) pins the session to a dedicated upstream
//! connection until it ends.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

mod cached;

use super::Context;
use super::client_list::{self, ListFilter};
use super::directory::{Enrollment, KillFilter, KillForm, Listing, Profile};
use super::outbox::{Outbox, Slot};
use super::route::{Route, may_block, route_spec};
use crate::cache::Invalidation;
use crate::command::CommandSpec;
use crate::protocol::ReplyScanner;
use crate::protocol::parser::parse_i64;
use crate::protocol::reply::{self, OK, Protocol, Reply};
use crate::protocol::{Parsed, Parser};
use crate::upstream::connection::Failed;
use crate::upstream::{Conn, Op, Pool, PoolKey, Replies, UpstreamError, encode_command};

/// One parsed command of the current read.
enum Cmd {
    /// A RESP command: its frame and argument ranges in the read chunk.
    Resp {
        frame: Range<usize>,
        args: Range<usize>,
    },
    /// An inline command, already split.
    Inline(Vec<Bytes>),
}

/// Consecutive forwarded commands not yet sent.
#[derive(Clone)]
struct Run {
    frames: Range<usize>,
    count: u32,
    pinned: bool,
}

/// A dedicated upstream connection held by this session.
struct Pin {
    conn: Conn,
    /// Every frame is relayed (pub/sub, MONITOR…): replies do not pair with commands.
    relay: bool,
    in_multi: bool,
    watching: bool,
    /// The connection's own state no longer matches its pool (SELECT or HELLO
    /// inside the pin), so it must be closed rather than reused.
    dirty: bool,
    /// Keys written inside MULTI, applied at EXEC.
    txn_inv: Invalidation,
    /// Commands Redis queued since MULTI.
    txn_queued: u32,
    /// Commands inside MULTI that nearcache answers itself (CLIENT SETNAME,
    /// GETNAME, ID, KILL, NO-EVICT, AUTH): Redis queues them and runs them at
    /// EXEC, so they
    /// are answered there, spliced into EXEC's reply after the `u32` queued
    /// commands before them.
    txn_local: Vec<(u32, Route, Vec<Bytes>)>,
    /// This session in the directory of pinned sessions, while pinned.
    _listing: Option<Listing>,
}

/// Whether the session goes on reading.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// Per-connection state and the request path.
pub struct Session {
    ctx: Arc<Context>,
    id: u64,
    db: u32,
    proto: Protocol,
    name: Option<Bytes>,
    authed: bool,
    pool: Arc<Pool>,
    /// The shared connection this session pipelines through (sticky, so a
    /// client's commands stay ordered relative to each other).
    conn: Option<Conn>,
    /// The [serial](Conn::serial) of the connection the session last sent to.
    last_conn: u64,
    pin: Option<Pin>,
    out: Outbox,
    argv: Vec<Bytes>,
    run: Option<Run>,
    /// Keys the pending run's writes touch, dropped again on its replies.
    run_inv: Invalidation,
    /// Keys the command being handled writes, not yet attached to a request.
    pending_inv: Invalidation,
    /// Reused buffers: cache ids, key positions.
    scratch: Vec<u8>,
    positions: Vec<(usize, u16)>,
    /// An MGET's cached elements, reused (see `cached_mget`).
    mget_buf: Vec<u8>,
    /// The session's entry in the directory, for `CLIENT KILL` and `CLIENT
    /// LIST`.
    enrollment: Enrollment,
    /// What the directory shows of the session (as last published).
    shown: Profile,
    /// `CLIENT NO-EVICT on`.
    no_evict: bool,
    /// The last command run, by its full name.
    last_cmd: &'static str,
    /// The client killed itself (`CLIENT KILL … SKIPME no`): close after the
    /// reply.
    closing: bool,
}

/// Longest run of commands sent upstream as one request, so that replies to a
/// huge pipeline start flowing back before all of it is answered.
const MAX_RUN: u32 = 256;

/// A copy of `arg` for keeping: arguments are slices of the client's input
/// buffer, and a slice kept for the session's life would keep that whole
/// buffer (a pipeline of large values, say) alive with it.
fn owned(arg: &Bytes) -> Bytes {
    Bytes::copy_from_slice(arg)
}

/// Redis's answer to credentials it does not accept.
const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

/// Serves one client until it disconnects, sends QUIT, breaks the protocol,
/// idles out, or the server shuts down.
///
/// One task does both directions: it writes whatever replies are ready, then
/// waits for the next of (a reply arriving, more input, shutdown, idleness).
/// Reading stops while `max_pending_replies` slots are unanswered, which is
/// the backpressure on clients that pipeline without reading.
pub async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Context>,
    id: u64,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    // `CLIENT KILL` from another client ends the session.
    let laddr = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let (enrollment, mut killed) = ctx.directory.enroll(id, peer, laddr, stream_fd(&stream));
    let mut session = Session {
        pool: ctx.default_pool.clone(),
        db: ctx.upstream.default_db(),
        proto: Protocol::Resp2,
        name: None,
        authed: ctx.cfg.server.password.is_none(),
        conn: None,
        last_conn: 0,
        pin: None,
        out: Outbox::new(ctx.l1.clone(), ctx.bus.clone()),
        argv: Vec::with_capacity(8),
        run: None,
        run_inv: Invalidation::default(),
        pending_inv: Invalidation::default(),
        scratch: Vec::with_capacity(64),
        positions: Vec::new(),
        mget_buf: Vec::new(),
        id,
        ctx: ctx.clone(),
        enrollment,
        shown: Profile::default(),
        no_evict: false,
        last_cmd: Profile::default().cmd,
        closing: false,
    };
    let mut input = Input {
        parser: Parser::new(ctx.limits),
        buf: BytesMut::with_capacity(16 * 1024),
        cmds: Vec::new(),
        ranges: Vec::new(),
    };
    let idle = ctx.cfg.server.idle_timeout.0;
    let max_pending = ctx.cfg.server.max_pending_replies;
    let mut shutdown = std::pin::pin!(shutdown_requested(shutdown));
    let mut reading = true;
    // Complete commands may be buffered but unparsed, and why.
    let mut backlog = Backlog::None;
    loop {
        if session.out.collect() {
            let _ = stream.write_all(&session.out.buf).await;
            break;
        }
        if !session.out.buf.is_empty() {
            if stream.write_all(&session.out.buf).await.is_err() {
                break;
            }
            session.out.buf.clear();
        }
        let room = max_pending.saturating_sub(session.out.pending_replies());
        // Redis runs one command of a client at a time, and one that blocks
        // holds back the rest; nearcache runs it on another connection, so
        // it waits for the replies before it, and what follows it for its own.
        let held = backlog == Backlog::Blocking && session.out.awaits_upstream();
        if backlog != Backlog::None && room > 0 && !held {
            match input.dispatch(&mut session, room).await {
                Ok(b) => backlog = b,
                Err(()) => reading = false,
            }
            continue;
        }
        if !reading && session.out.is_empty() {
            break;
        }
        // While held, input is still read (up to a bound), so a client that
        // leaves is noticed and its blocked command abandoned.
        let can_read = reading
            && room > 0
            && (backlog == Backlog::None || (held && input.buf.len() < HELD_INPUT_LIMIT));
        let relaying = session.out.relaying();
        tokio::select! {
            biased;
            _ = session.out.ready(), if !session.out.is_empty() => continue,
            read = stream.read_buf(&mut input.buf), if can_read => match read {
                Ok(0) | Err(_) => {
                    // Half-closed clients (`nc -q`, piped redis-cli) still get
                    // every reply: stop reading, keep writing. What would never
                    // end without the client is dropped, as Redis drops it.
                    reading = false;
                    session.out.abandon_unbounded();
                    if session.pin.as_ref().is_some_and(|p| p.relay) {
                        session.pin = None;
                    }
                    continue;
                }
                Ok(_) if backlog != Backlog::None => {}
                Ok(_) => match input.dispatch(&mut session, room).await {
                    Ok(b) => backlog = b,
                    Err(()) => reading = false,
                },
            },
            _ = &mut shutdown, if reading => {
                // In-flight requests finish (within shutdown_timeout); a
                // subscriber would never finish on its own.
                reading = false;
                session.out.end_relays();
                if session.pin.as_ref().is_some_and(|p| p.relay) {
                    session.pin = None;
                }
                continue;
            }
            _ = idle_expired(idle), if can_read && !relaying && session.out.is_empty() => break,
            // (Its sender stays in the directory until a kill sends on it.)
            _ = &mut killed => break,
        }
        let wanted = input.parser.bytes_wanted(input.buf.len());
        input.buf.reserve(wanted.max(4096));
    }
    let _ = stream.shutdown().await;
}

/// Nearcache's descriptor for a client's connection (`fd=` in `CLIENT
/// LIST`; -1 where descriptors are not numbers).
fn stream_fd(stream: &TcpStream) -> i64 {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        i64::from(stream.as_raw_fd())
    }
    #[cfg(not(unix))]
    {
        let _ = stream;
        -1
    }
}

/// Why complete commands were left in the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backlog {
    /// None were.
    None,
    /// The reply budget ran out.
    Full,
    /// A command that may block is next, or was just sent: see `held`.
    Blocking,
}

/// How much input a session held behind a blocking command still reads.
const HELD_INPUT_LIMIT: usize = 1 << 20;

/// A client's unparsed input and the per-read scratch vectors (reused, so a
/// read allocates nothing).
struct Input {
    parser: Parser,
    buf: BytesMut,
    cmds: Vec<Cmd>,
    ranges: Vec<Range<usize>>,
}

impl Input {
    /// Parses up to `room` commands from the buffer and runs them through the
    /// session, stopping before a command that may block unless every earlier
    /// reply is in, and right after it. `Ok(backlog)`: whether complete
    /// commands remain, and why; `Err(())`: the client is finished (protocol
    /// error or QUIT).
    async fn dispatch(&mut self, session: &mut Session, room: usize) -> Result<Backlog, ()> {
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
        session.enrollment.touch();
        session.publish_profile();
        if let Some(e) = error {
            tracing::debug!(client = session.id, error = %e, "protocol error; closing");
            session.reply(e.to_reply());
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
async fn shutdown_requested(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            // The server is gone without a signal: nothing to wait for.
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves when the client has been idle too long (never when disabled).
async fn idle_expired(idle: std::time::Duration) {
    if idle.is_zero() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(idle).await;
}

impl Session {
    async fn process(&mut self, chunk: &Bytes, cmds: &[Cmd], ranges: &[Range<usize>]) -> Flow {
        for cmd in cmds {
            self.argv.clear();
            let frame = match cmd {
                Cmd::Resp { frame, args } => {
                    self.argv
                        .extend(ranges[args.clone()].iter().map(|r| chunk.slice(r.clone())));
                    Some(frame.clone())
                }
                Cmd::Inline(args) => {
                    self.argv.extend_from_slice(args);
                    None
                }
            };
            let flow = self.handle(chunk, frame).await;
            // Keys of a write that got no reply slot of its own (relayed, or
            // refused here) must not ride on a later, unrelated one.
            self.pending_inv = Invalidation::default();
            if flow == Flow::Stop {
                self.flush_run(chunk).await;
                return Flow::Stop;
            }
        }
        self.flush_run(chunk).await;
        Flow::Continue
    }

    /// Routes and handles the command in `self.argv`; `frame` is its range in
    /// `chunk` (None for inline commands, which are re-encoded).
    async fn handle(&mut self, chunk: &Bytes, frame: Option<Range<usize>>) -> Flow {
        let (route, spec) = route_spec(&self.argv);
        // Only forwarded commands join the run of commands waiting to go
        // upstream together. Anything else is answered here or changes the
        // session (SELECT moves it to another database's connection), so the
        // run goes first: its replies come first, on the connection it was
        // read for.
        if route != Route::Forward {
            self.flush_run(chunk).await;
        }
        if !self.authed
            && !matches!(
                route,
                Route::Auth | Route::Hello | Route::Quit | Route::Reset
            )
        {
            self.reply(Bytes::from_static(b"-NOAUTH Authentication required.\r\n"));
            return Flow::Continue;
        }
        if let Some(spec) = spec {
            self.last_cmd = spec.name;
            self.note_write(spec);
        }
        let mut frame = frame;
        // (The route first: an enum compare on every command, the name only
        // for the rare relaying ones.)
        if route == Route::Relay && spec.is_some_and(|s| s.name == "client|tracking") {
            match self.redirect_to_redis_id() {
                // The argument changed: the command is sent re-encoded.
                Ok(true) => frame = None,
                Ok(false) => {}
                Err(e) => {
                    self.reply(e);
                    return Flow::Continue;
                }
            }
        }
        if self.pin.as_ref().is_some_and(|p| p.relay) {
            return self.handle_relaying(chunk, frame, route, spec).await;
        }
        match route {
            Route::Forward => {
                if let Some(spec) = spec {
                    if self.cached_read(chunk, &frame, spec).await {
                        return Flow::Continue;
                    }
                }
                if let Some(set) = self
                    .ctx
                    .l1
                    .as_deref()
                    .and_then(|l1| cached::with_upstream_ttl(l1, &self.argv))
                {
                    self.flush_run(chunk).await;
                    self.count_queued();
                    let inv = std::mem::take(&mut self.pending_inv);
                    self.send_upstream(set, 1, self.pin.is_some(), inv).await;
                    return Flow::Continue;
                }
                self.forward(chunk, frame, self.pin.is_some()).await;
            }
            Route::Proxy => {
                let r = crate::admin::proxy_command(&self.argv, &self.ctx, self.proto);
                self.reply(r);
            }
            Route::Quit => {
                self.reply(Bytes::from_static(OK));
                self.push(Slot::Close);
                return Flow::Stop;
            }
            Route::ClientSetName
            | Route::ClientGetName
            | Route::ClientId
            | Route::ClientKill
            | Route::ClientNoEvict
            | Route::ClientList
            | Route::ClientInfo
            | Route::Auth
                if self.pin.as_ref().is_some_and(|p| p.in_multi) =>
            {
                if let Some(pin) = &mut self.pin {
                    pin.txn_local
                        .push((pin.txn_queued, route, std::mem::take(&mut self.argv)));
                }
                self.reply(Bytes::from_static(b"+QUEUED\r\n"));
            }
            Route::Auth
            | Route::ClientSetName
            | Route::ClientGetName
            | Route::ClientId
            | Route::ClientKill
            | Route::ClientNoEvict
            | Route::ClientList
            | Route::ClientInfo => {
                let r = self.local_reply(route).await;
                self.reply(r);
                if self.closing {
                    self.push(Slot::Close);
                    return Flow::Stop;
                }
            }
            Route::Hello => {
                if let Some(pin) = &mut self.pin {
                    // The pinned connection's replies must switch protocol too,
                    // so Redis itself answers.
                    pin.dirty = true;
                    let requested = requested_protocol(&self.argv);
                    if pin.in_multi {
                        // Queued: it takes effect at EXEC, if at all; the
                        // unpin reads back what the connection ended up with.
                        if let Some(p) = requested {
                            self.proto = p;
                        }
                        self.forward(chunk, frame, true).await;
                    } else {
                        let mut r = self.ask_pinned(chunk, frame).await;
                        if let (Some(p), Some(b'%' | b'*')) = (requested, r.first()) {
                            self.proto = p;
                        }
                        // Redis reports its id for the pinned connection; the
                        // client's id is nearcache's, as CLIENT ID says.
                        if let Some(ours) = with_hello_id(&r, self.id) {
                            r = ours;
                        }
                        self.reply(r);
                    }
                } else {
                    let r = self.hello().await;
                    self.reply(r);
                }
            }
            Route::Select => self.select(chunk, frame).await,
            Route::ClientUnblock => {
                // The id is nearcache's (what CLIENT ID answered); Redis knows
                // that client by the connection it is blocked or pinned on.
                // Any other id becomes one no Redis client has, so Redis still
                // checks the arguments and answers 0 as for a stranger.
                let target = self.argv.get(2).and_then(|a| parse_i64(a));
                if let Some(id) = target {
                    let redis_id = u64::try_from(id)
                        .ok()
                        .and_then(|id| self.ctx.directory.redis_id(id))
                        .unwrap_or(i64::MAX as u64);
                    self.argv[2] = Bytes::from(redis_id.to_string());
                    frame = None;
                }
                self.forward(chunk, frame, self.pin.is_some()).await;
            }
            Route::Reset => {
                self.flush_run(chunk).await;
                self.pin = None;
                self.reset_state().await;
                self.reply(Bytes::from_static(b"+RESET\r\n"));
            }
            Route::Multi | Route::Watch => {
                if self.pin.is_none() && !self.pin_dedicated().await {
                    return Flow::Continue;
                }
                // Forwarded first: MULTI itself is not one of the commands
                // the transaction queues.
                self.forward(chunk, frame, true).await;
                if let Some(pin) = &mut self.pin {
                    match route {
                        // (A nested MULTI is Redis's error; the first stands.)
                        Route::Multi if !pin.in_multi => {
                            pin.in_multi = true;
                            pin.txn_queued = 0;
                            pin.txn_local.clear();
                        }
                        Route::Multi => {}
                        _ if !pin.in_multi => pin.watching = true,
                        _ => {}
                    }
                }
            }
            Route::EndTransaction | Route::Unwatch => {
                let Some(pin) = &mut self.pin else {
                    // Not in a transaction here: Redis gives its own error.
                    self.forward(chunk, frame, false).await;
                    return Flow::Continue;
                };
                let mut local = Vec::new();
                match route {
                    Route::EndTransaction if pin.in_multi => {
                        pin.in_multi = false;
                        pin.watching = false;
                        local = std::mem::take(&mut pin.txn_local);
                        if spec.is_some_and(|s| s.name == "exec") {
                            self.exec_writes();
                        } else {
                            local.clear();
                            if let Some(pin) = &mut self.pin {
                                pin.txn_inv = Invalidation::default();
                            }
                        }
                    }
                    Route::Unwatch if !pin.in_multi => pin.watching = false,
                    _ => {}
                }
                self.forward(chunk, frame, true).await;
                if !local.is_empty() {
                    self.flush_run(chunk).await;
                    self.exec_local(local).await;
                    if self.closing {
                        self.push(Slot::Close);
                        return Flow::Stop;
                    }
                }
                self.maybe_unpin(chunk).await;
            }
            Route::Blocking | Route::Wait if self.pin.is_some() => {
                // Alone, so its slot can be abandoned without the others. (A
                // WAIT counts acks for the pinned connection's writes, which
                // are this client's: the right place for it.)
                self.flush_run(chunk).await;
                let frames = match frame {
                    Some(f) => chunk.slice(f),
                    None => encode_command(&self.argv),
                };
                self.count_queued();
                let inv = std::mem::take(&mut self.pending_inv);
                self.send_pinned(frames, 1, true, inv).await;
            }
            Route::Blocking => self.blocking(chunk, frame).await,
            Route::Wait => self.wait(chunk, frame).await,
            Route::Relay => self.start_relay(chunk, frame).await,
            Route::WrongArity(_) if self.pin.as_ref().is_some_and(|p| p.in_multi) => {
                // Redis must see it: a queuing error makes EXEC fail with
                // EXECABORT, and answering here would let the rest commit.
                self.forward(chunk, frame, true).await;
            }
            Route::Refuse(_) | Route::WrongArity(_) => {
                let r = self.local_reply(route).await;
                self.reply(r);
            }
        }
        Flow::Continue
    }

    /// In relay mode everything goes to the pinned connection and comes back
    /// as relayed frames, except what only the proxy can answer.
    async fn handle_relaying(
        &mut self,
        chunk: &Bytes,
        frame: Option<Range<usize>>,
        route: Route,
        spec: Option<&'static CommandSpec>,
    ) -> Flow {
        // What Redis answers a RESP2 subscriber for anything but
        // (un)subscribing, PING, QUIT and RESET (arity is checked first).
        let refused = || {
            let name = spec.map_or("", |s| s.name);
            reply::error(&format!(
                "ERR Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
            ))
        };
        // Only Redis knows whether the client is still subscribed when the
        // command runs (its answer to the stand-in's PING tells). A command
        // with effects cannot wait for that: while the client may be
        // subscribed, Redis would refuse it, so it is refused here.
        let maybe_subscribed = self.proto == Protocol::Resp2 && self.enrollment.pubsub();
        match route {
            Route::Auth
            | Route::ClientId
            | Route::ClientGetName
            | Route::ClientKill
            | Route::ClientNoEvict
            | Route::ClientList
            | Route::ClientInfo
            | Route::Refuse(_)
            | Route::WrongArity(_) => {
                let r = if route == Route::ClientKill && maybe_subscribed {
                    refused()
                } else {
                    self.local_reply(route).await
                };
                let subscribed = match route {
                    Route::WrongArity(_) => r.clone(),
                    _ => refused(),
                };
                self.flush_run(chunk).await;
                if let Some(pin) = &self.pin {
                    // (Closing, the reply goes at once and the relay ends
                    // with it: the session's last word.)
                    let _ = pin.conn.send(if self.closing {
                        Op::InjectLast(r)
                    } else {
                        Op::Inject {
                            reply: r,
                            subscribed,
                        }
                    });
                }
                if self.closing {
                    self.pin = None;
                    self.push(Slot::Close);
                    return Flow::Stop;
                }
                Flow::Continue
            }
            _ => {
                match route {
                    Route::Select => {
                        if let Some(db) = self.argv.get(1).and_then(|a| parse_i64(a)) {
                            self.db = u32::try_from(db).unwrap_or(self.db);
                        }
                    }
                    Route::Hello => {
                        if let Some(p) = requested_protocol(&self.argv) {
                            self.proto = p;
                        }
                    }
                    // (Redis refuses it while the client is subscribed.)
                    Route::ClientSetName if !maybe_subscribed => {
                        self.name = self.argv.get(2).map(owned);
                    }
                    Route::Relay => self.note_subscribe(),
                    _ => {}
                }
                self.forward(chunk, frame, true).await;
                match route {
                    Route::Quit => Flow::Stop,
                    Route::Reset => {
                        // The relay ends with Redis's +RESET; the connection
                        // closes after it, and the session starts afresh.
                        self.flush_run(chunk).await;
                        self.pin = None;
                        self.reset_state().await;
                        Flow::Continue
                    }
                    _ => Flow::Continue,
                }
            }
        }
    }

    /// Counts a command sent to the pinned connection inside MULTI (Redis
    /// queues it), for [`Session::exec_local`]'s splicing.
    fn count_queued(&mut self) {
        if let Some(pin) = self.pin.as_mut().filter(|p| p.in_multi) {
            pin.txn_queued += 1;
        }
    }

    /// Adds the current command to the pending run (or sends an inline one).
    async fn forward(&mut self, chunk: &Bytes, frame: Option<Range<usize>>, pinned: bool) {
        if pinned {
            self.count_queued();
        }
        let Some(frame) = frame else {
            self.flush_run(chunk).await;
            let bytes = encode_command(&self.argv);
            let inv = std::mem::take(&mut self.pending_inv);
            self.send_upstream(bytes, 1, pinned, inv).await;
            return;
        };
        if let Some(run) = &mut self.run {
            if run.pinned == pinned && run.frames.end == frame.start && run.count < MAX_RUN {
                run.frames.end = frame.end;
                run.count += 1;
                self.run_inv.extend(std::mem::take(&mut self.pending_inv));
                return;
            }
        }
        // The previous run leaves with its own keys; this command's go with it.
        self.flush_run(chunk).await;
        self.run_inv = std::mem::take(&mut self.pending_inv);
        self.run = Some(Run {
            frames: frame,
            count: 1,
            pinned,
        });
    }

    async fn flush_run(&mut self, chunk: &Bytes) {
        if let Some(run) = self.run.take() {
            let inv = std::mem::take(&mut self.run_inv);
            self.send_upstream(chunk.slice(run.frames), run.count, run.pinned, inv)
                .await;
        }
    }

    /// The sticky shared connection, or a fresh one from the pool.
    async fn shared_conn(&mut self) -> Result<Conn, UpstreamError> {
        let conn = match self.conn.as_ref().filter(|c| !c.is_closed()) {
            Some(conn) => conn.clone(),
            None => {
                let conn = self.pool.shared().await?;
                self.conn = Some(conn.clone());
                conn
            }
        };
        self.order_after(conn.serial()).await;
        Ok(conn)
    }

    /// Called before sending on a connection. Redis runs each connection's
    /// commands in order, and nothing orders two connections: when the
    /// session last sent on another one (it was pinned, or in another
    /// database), the replies to what it sent there come in first, so that,
    /// say, a `GET` pipelined behind `EXEC` runs after the transaction.
    async fn order_after(&mut self, serial: u64) {
        if self.last_conn != serial {
            if self.out.awaits_upstream() {
                self.out.settle_upstream().await;
            }
            self.last_conn = serial;
        }
    }

    /// [`Session::order_after`] for the pinned connection, if any.
    async fn order_for_pin(&mut self) {
        if let Some(serial) = self.pin.as_ref().map(|p| p.conn.serial()) {
            self.order_after(serial).await;
        }
    }

    /// Sends `count` commands upstream and queues the slot for their replies.
    async fn send_upstream(&mut self, frames: Bytes, count: u32, pinned: bool, inv: Invalidation) {
        if pinned {
            return self.send_pinned(frames, count, false, inv).await;
        }
        let (mut op, rx) = Op::request(frames, count, false);
        // The sticky connection first; if it died, one fresh one from the pool.
        for _ in 0..2 {
            let conn = match self.shared_conn().await {
                Ok(conn) => conn,
                Err(e) => return self.reply(e.to_replies(count as usize)),
            };
            match conn.send(op) {
                Ok(()) => {
                    return self.push(Slot::Upstream {
                        rx,
                        count,
                        blocking: false,
                        inv,
                    });
                }
                Err(back) => {
                    op = back;
                    self.conn = None;
                }
            }
        }
        self.reply(UpstreamError::ConnectionLost.to_replies(count as usize));
    }

    /// Sends commands over the pinned connection (written only, when relaying).
    async fn send_pinned(&mut self, frames: Bytes, count: u32, blocking: bool, inv: Invalidation) {
        self.order_for_pin().await;
        let Some(pin) = &self.pin else {
            return self.reply(UpstreamError::ConnectionLost.to_replies(count as usize));
        };
        if pin.relay {
            if pin.conn.send(Op::Write { frames }).is_err() {
                self.pin = None;
            }
            return;
        }
        let (op, rx) = Op::request(frames, count, blocking);
        if pin.conn.send(op).is_err() {
            // The dedicated connection died: its state (MULTI, WATCH) is gone,
            // so the client must hear about it.
            self.pin = None;
            return self.reply(UpstreamError::ConnectionLost.to_replies(count as usize));
        }
        self.push(Slot::Upstream {
            rx,
            count,
            blocking,
            inv,
        });
    }

    /// Runs a blocking command on a dedicated connection that goes back to the
    /// idle list once it answers (or is closed if the client leaves first).
    async fn blocking(&mut self, chunk: &Bytes, frame: Option<Range<usize>>) {
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
        let inv = std::mem::take(&mut self.pending_inv);
        self.push(Slot::Upstream {
            rx: client_rx,
            count: 1,
            blocking: true,
            inv,
        });
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
    async fn wait(&mut self, chunk: &Bytes, frame: Option<Range<usize>>) {
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
        let inv = std::mem::take(&mut self.pending_inv);
        self.push(Slot::Upstream {
            rx: client_rx,
            count: 1,
            blocking: true,
            inv,
        });
    }

    async fn pin_dedicated(&mut self) -> bool {
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
    fn redirect_to_redis_id(&mut self) -> Result<bool, Bytes> {
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
    async fn maybe_unpin(&mut self, chunk: &Bytes) {
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
    async fn ask_pinned(&mut self, chunk: &Bytes, frame: Option<Range<usize>>) -> Bytes {
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
    async fn exec_local(&mut self, local: Vec<(u32, Route, Vec<Bytes>)>) {
        let Some(Ok(reply)) = self.out.last_replies().await else {
            return;
        };
        let spliced = self.splice_exec(&reply, local).await;
        self.out.answer_last(Ok(spliced.unwrap_or(reply)));
    }

    async fn splice_exec(
        &mut self,
        exec: &Bytes,
        local: Vec<(u32, Route, Vec<Bytes>)>,
    ) -> Option<Bytes> {
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
        let saved = std::mem::take(&mut self.argv);
        for (before, route, argv) in local {
            // (Positions only grow: each local command came after the last.)
            let upto = (before as usize).clamp(next, n);
            for e in &elements[next..upto] {
                out.extend_from_slice(&exec[e.clone()]);
            }
            next = upto;
            self.argv = argv;
            let r = self.local_reply(route).await;
            out.extend_from_slice(&r);
        }
        self.argv = saved;
        for e in &elements[next..] {
            out.extend_from_slice(&exec[e.clone()]);
        }
        Some(out.freeze())
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

    /// Switches to relay mode with the current command as the first relayed one.
    async fn start_relay(&mut self, chunk: &Bytes, frame: Option<Range<usize>>) {
        self.flush_run(chunk).await;
        if self.pin.is_none() && !self.pin_dedicated().await {
            return;
        }
        let frames = match frame {
            Some(f) => chunk.slice(f),
            None => encode_command(&self.argv),
        };
        let (tx, rx) = mpsc::channel(1024);
        self.order_for_pin().await;
        let Some(pin) = &mut self.pin else { return };
        if pin.conn.send(Op::Relay { frames, tx }).is_err() {
            self.pin = None;
            return self.reply(UpstreamError::ConnectionLost.to_reply());
        }
        pin.relay = true;
        pin.dirty = true;
        self.push(Slot::Relay(rx));
        self.note_subscribe();
    }

    async fn select(&mut self, chunk: &Bytes, frame: Option<Range<usize>>) {
        let Some(db) = self.argv.get(1).and_then(|a| parse_i64(a)) else {
            return self.reply(reply::error("ERR value is not an integer or out of range"));
        };
        let Ok(db) = u32::try_from(db) else {
            return self.reply(reply::error("ERR DB index is out of range"));
        };
        if let Some(pin) = &mut self.pin {
            pin.dirty = true;
            if pin.in_multi {
                // Queued: it takes effect at EXEC, if at all. The keys of the
                // writes queued after it are taken in `db` (more invalidation
                // rather than less), and the unpin reads back where the
                // connection ended up.
                self.db = db;
                return self.forward(chunk, frame, true).await;
            }
            // Effective now if Redis accepts it: the writes that follow (and
            // their invalidations) are in `db` only then.
            let r = self.ask_pinned(chunk, frame).await;
            if &r[..] == OK {
                self.db = db;
            }
            return self.reply(r);
        }
        match self.switch_pool(db, self.proto).await {
            Ok(()) => self.reply(Bytes::from_static(OK)),
            Err(UpstreamError::Rejected(msg)) => self.reply(reply::error(&msg)),
            Err(e) => self.reply(e.to_reply()),
        }
    }

    async fn switch_pool(&mut self, db: u32, proto: Protocol) -> Result<(), UpstreamError> {
        if self.pool.key() != (PoolKey { db, proto }) {
            self.pool = self.ctx.upstream.pool(PoolKey { db, proto }).await?;
            self.conn = None;
        }
        self.db = db;
        self.proto = proto;
        Ok(())
    }

    fn auth(&mut self) -> Bytes {
        let (user, pass) = match &self.argv[1..] {
            [pass] => (None, pass),
            [user, pass] => (Some(user), pass),
            _ => return reply::error("ERR syntax error"),
        };
        let default_user = user.is_none_or(|u| &u[..] == b"default");
        let Some(expected) = &self.ctx.cfg.server.password else {
            // As Redis's `default` user without a password (`nopass`): it
            // takes any password when named, so clients configured with
            // credentials still connect; the one-argument form is refused.
            return match user {
                None => reply::error(
                    "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
                ),
                Some(_) if default_user => {
                    self.authed = true;
                    Bytes::from_static(OK)
                }
                Some(_) => reply::error(WRONGPASS),
            };
        };
        if !default_user || !constant_time_eq(pass, expected.as_bytes()) {
            return reply::error(WRONGPASS);
        }
        self.authed = true;
        Bytes::from_static(OK)
    }

    async fn hello(&mut self) -> Bytes {
        let mut proto = self.proto;
        let args = &self.argv[1..];
        if let Some(v) = args.first() {
            match parse_i64(v) {
                Some(2) => proto = Protocol::Resp2,
                Some(3) => proto = Protocol::Resp3,
                Some(_) => return reply::error("NOPROTO unsupported protocol version"),
                None => {
                    return reply::error("ERR Protocol version is not an integer or out of range");
                }
            }
        }
        let mut i = 1;
        let mut auth = None;
        let mut name = None;
        while i < args.len() {
            let opt = &args[i];
            if opt.eq_ignore_ascii_case(b"auth") && args.len() > i + 2 {
                auth = Some((args[i + 1].clone(), args[i + 2].clone()));
                i += 3;
            } else if opt.eq_ignore_ascii_case(b"setname") && args.len() > i + 1 {
                name = Some(args[i + 1].clone());
                i += 2;
            } else {
                return reply::error(&format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(opt)
                ));
            }
        }
        if let Some((user, pass)) = auth {
            self.argv.truncate(1);
            self.argv.push(user);
            self.argv.push(pass);
            let r = self.auth();
            if &r[..] != OK {
                return r;
            }
        }
        if !self.authed {
            return reply::error(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
            );
        }
        if let Some(name) = name {
            if !valid_client_name(&name) {
                return reply::error(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                );
            }
            self.name = (!name.is_empty()).then(|| owned(&name));
        }
        if let Err(e) = self.switch_pool(self.db, proto).await {
            return e.to_reply();
        }
        let version = self.ctx.upstream.server_version();
        let mut r = Reply::new(proto);
        r.map(7);
        r.bulk(b"server").bulk(b"redis");
        r.bulk(b"version").bulk(version.as_bytes());
        r.bulk(b"proto").int(proto.version());
        r.bulk(b"id").int(self.id as i64);
        r.bulk(b"mode").bulk(b"standalone");
        r.bulk(b"role").bulk(b"master");
        r.bulk(b"modules").array(0);
        r.finish()
    }

    /// The reply to a command nearcache answers itself, from the session's
    /// state (the command is in `argv`).
    async fn local_reply(&mut self, route: Route) -> Bytes {
        match route {
            Route::Auth => self.auth(),
            Route::ClientSetName => self.set_name(),
            Route::ClientGetName => {
                let mut r = Reply::new(self.proto);
                match &self.name {
                    Some(name) => r.bulk(name),
                    None => r.null(),
                };
                r.finish()
            }
            Route::ClientId => {
                let mut r = Reply::new(self.proto);
                r.int(self.id as i64);
                r.finish()
            }
            Route::ClientKill => self.client_kill(),
            Route::ClientList => self.client_list(false).await,
            Route::ClientInfo => self.client_list(true).await,
            // Redis never evicts a client of nearcache: there is nothing to
            // protect, and the shared connection must not carry the flag.
            // (Shown as the `e` flag in CLIENT LIST, as Redis shows it.)
            Route::ClientNoEvict => match self.argv.get(2) {
                Some(v) if v.eq_ignore_ascii_case(b"on") || v.eq_ignore_ascii_case(b"off") => {
                    self.no_evict = v.eq_ignore_ascii_case(b"on");
                    Bytes::from_static(OK)
                }
                _ => reply::error("ERR syntax error"),
            },
            Route::Refuse(msg) => reply::error(msg),
            Route::WrongArity(name) => reply::error(&format!(
                "ERR wrong number of arguments for '{name}' command"
            )),
            _ => reply::error("ERR internal: not a command nearcache answers"),
        }
    }

    /// `CLIENT KILL`: closes nearcache's clients that match, never the
    /// upstream connections they share (Redis's view, where `TYPE normal`
    /// would take every client's requests in flight down with them).
    fn client_kill(&mut self) -> Bytes {
        let (filter, form) = match KillFilter::parse(self.argv.get(2..).unwrap_or_default()) {
            Ok(parsed) => parsed,
            Err(e) => return reply::error(&e),
        };
        let (killed, me) = self.ctx.directory.kill(&filter, self.id);
        self.closing |= me;
        match form {
            KillForm::Old if killed == 0 => reply::error("ERR No such client"),
            KillForm::Old => Bytes::from_static(OK),
            KillForm::Filters => {
                let mut r = Reply::new(self.proto);
                r.int(killed as i64);
                r.finish()
            }
        }
    }

    /// `CLIENT LIST` (or `CLIENT INFO`, the caller's line alone): nearcache's
    /// clients, with Redis's state of the dedicated connections some are
    /// pinned to (see `client_list.rs`).
    async fn client_list(&mut self, info: bool) -> Bytes {
        let filter = if info {
            ListFilter::Ids(vec![self.id as i64])
        } else {
            match ListFilter::parse(self.argv.get(2..).unwrap_or_default()) {
                Ok(filter) => filter,
                Err(e) => return reply::error(&e),
            }
        };
        // Earlier commands of this batch may have changed what it shows.
        self.publish_profile();
        let directory = self.ctx.directory.clone();
        let clients = directory.clients();
        let picked = filter.select(&clients);
        let pinned: Vec<u64> = picked.iter().filter_map(|c| c.redis_id).collect();
        let theirs = if pinned.is_empty() {
            None
        } else {
            self.redis_client_list(&pinned).await
        };
        let redis = theirs
            .as_deref()
            .and_then(client_list::text_of)
            .map(client_list::redis_lines)
            .unwrap_or_default();
        // (Queued in a transaction, the command running is EXEC.)
        let caller = client_list::Caller {
            id: self.id,
            cmd: self.last_cmd,
        };
        let text = client_list::render(&picked, &filter, &redis, caller, |r| {
            directory.session_of(r)
        });
        let mut r = Reply::new(self.proto);
        r.text(text.as_bytes());
        r.finish()
    }

    /// Redis's `CLIENT LIST ID …` reply for the connections `ids`, over a
    /// shared connection; None if Redis cannot say (the lines then show
    /// what nearcache knows).
    async fn redis_client_list(&self, ids: &[u64]) -> Option<Bytes> {
        let mut argv = vec![
            Bytes::from_static(b"CLIENT"),
            Bytes::from_static(b"LIST"),
            Bytes::from_static(b"ID"),
        ];
        argv.extend(ids.iter().map(|id| Bytes::from(id.to_string())));
        let conn = self.pool.shared().await.ok()?;
        let (op, rx) = Op::request(encode_command(&argv), 1, false);
        conn.send(op).ok()?;
        rx.await.ok()?.ok()
    }

    /// Publishes what `CLIENT LIST` shows of this session, if it changed.
    fn publish_profile(&mut self) {
        let shown = &self.shown;
        let changed = shown.db != self.db
            || shown.resp != self.proto.version()
            || shown.no_evict != self.no_evict
            || !std::ptr::eq(shown.cmd, self.last_cmd)
            || shown.name != self.name;
        if changed {
            self.shown = Profile {
                name: self.name.clone(),
                db: self.db,
                resp: self.proto.version(),
                no_evict: self.no_evict,
                cmd: self.last_cmd,
            };
            self.enrollment.publish(&self.shown);
        }
    }

    fn set_name(&mut self) -> Bytes {
        let Some(name) = self.argv.get(2) else {
            return reply::error("ERR wrong number of arguments for 'client|setname' command");
        };
        if !valid_client_name(name) {
            return reply::error(
                "ERR Client names cannot contain spaces, newlines or special characters.",
            );
        }
        self.name = (!name.is_empty()).then(|| owned(name));
        Bytes::from_static(OK)
    }

    /// A SUBSCRIBE of any kind makes the client `pubsub` for `CLIENT KILL
    /// TYPE` (until RESET: unsubscribing from everything is not tracked).
    fn note_subscribe(&self) {
        let name = &self.argv[0];
        if [&b"subscribe"[..], b"psubscribe", b"ssubscribe"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
        {
            self.enrollment.set_pubsub(true);
        }
    }

    async fn reset_state(&mut self) {
        self.enrollment.set_pubsub(false);
        self.no_evict = false;
        self.name = None;
        self.authed = self.ctx.cfg.server.password.is_none();
        self.pool = self.ctx.default_pool.clone();
        self.db = self.ctx.upstream.default_db();
        self.proto = Protocol::Resp2;
        self.conn = None;
    }

    /// Queues a reply the proxy produced, after everything already queued.
    fn reply(&mut self, bytes: Bytes) {
        self.out.put_bytes(bytes);
    }

    fn push(&mut self, slot: Slot) {
        self.out.push(slot);
    }
}

/// `HELLO`'s reply with the value of its `id` field replaced by `id`.
fn with_hello_id(hello: &[u8], id: u64) -> Option<Bytes> {
    const KEY: &[u8] = b"$2\r\nid\r\n:";
    let at = hello.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let end = at + hello[at..].iter().position(|&b| b == b'\r')?;
    let mut out = BytesMut::with_capacity(hello.len() + 20);
    out.extend_from_slice(&hello[..at]);
    out.extend_from_slice(id.to_string().as_bytes());
    out.extend_from_slice(&hello[end..]);
    Some(out.freeze())
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

/// Where WAIT's preliminary write goes (see `Session::wait`).
const WAIT_CHANNEL: &[u8] = b"__nearcache:wait";

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

/// The protocol a HELLO asks for, if it names a valid one.
fn requested_protocol(argv: &[Bytes]) -> Option<Protocol> {
    match argv.get(1).and_then(|v| parse_i64(v)) {
        Some(2) => Some(Protocol::Resp2),
        Some(3) => Some(Protocol::Resp3),
        _ => None,
    }
}

/// Redis's rule: printable ASCII without spaces.
fn valid_client_name(name: &[u8]) -> bool {
    name.iter().all(|&c| (b'!'..=b'~').contains(&c))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_hello_id_replaces_only_the_id() {
        let hello =
            b"%3\r\n$6\r\nserver\r\n$5\r\nredis\r\n$2\r\nid\r\n:1234\r\n$5\r\nproto\r\n:3\r\n";
        let ours = with_hello_id(hello, 7).expect("has an id");
        assert_eq!(
            &ours[..],
            b"%3\r\n$6\r\nserver\r\n$5\r\nredis\r\n$2\r\nid\r\n:7\r\n$5\r\nproto\r\n:3\r\n"
        );
        assert_eq!(with_hello_id(b"-NOPROTO sorry\r\n", 7), None);
    }

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
