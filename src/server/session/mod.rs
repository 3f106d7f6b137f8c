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
//! (database, protocol, name, authentication: `local.rs`) so that shared
//! upstream connections stay stateless; state that only Redis can keep
//! (MULTI, WATCH, subscriptions, a blocked command) pins the session to a
//! dedicated upstream connection until it ends (`pinned.rs`).

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

mod cached;
mod local;
mod pinned;

use local::{requested_protocol, with_hello_id};
use pinned::Pin;

use super::Context;
use super::directory::{Enrollment, Profile};
use super::outbox::{Outbox, Slot};
use super::route::{Route, may_block, route_spec};
use crate::cache::Invalidation;
use crate::command::CommandSpec;
use crate::protocol::parser::parse_i64;
use crate::protocol::reply::{self, OK, Protocol};
use crate::protocol::{Parsed, Parser};
use crate::upstream::{Conn, OnAnswer, Op, Pool, UpstreamError, encode_command};

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
    /// `CLIENT REPLY OFF`: its replies are dropped here (in a relay, Redis
    /// applies CLIENT REPLY; see `start_relay`).
    reply_off: bool,
    /// `CLIENT REPLY SKIP`: the next command's reply is dropped.
    skip_next: bool,
    /// The command being handled is the skipped one.
    skipping: bool,
    /// What a relay keeps to acknowledge its client's writes.
    relay: RelayBook,
}

/// A relayed client's writes and what nearcache knows of the replies to
/// them (see `Session::ack_relayed`). Starts afresh with each relay.
#[derive(Default)]
struct RelayBook {
    /// Keys written since the last acknowledgement.
    inv: Invalidation,
    /// Inside MULTI: its writes wait for EXEC.
    multi: bool,
    /// Replies (other than pushes) the relayed commands not yet handed to
    /// the connection draw, for [`Op::Ack`]'s count.
    due: u32,
    /// Every relayed command's replies can be counted (not after MONITOR,
    /// CLIENT REPLY, HELLO, a subscription): writes are then published once
    /// answered, else as they are sent.
    countable: bool,
    /// Keys written since a MULTI, published again after EXEC (see
    /// `Session::ack_relayed`).
    txn_inv: Invalidation,
    /// After a SELECT Redis may not have run: keys are dropped in every
    /// database.
    db_uncertain: bool,
}

/// Keys a relayed transaction keeps for its second acknowledgement, at most.
const MAX_TXN_KEYS: usize = 65_536;

/// Longest run of commands sent upstream as one request, so that replies to a
/// huge pipeline start flowing back before all of it is answered.
const MAX_RUN: u32 = 256;

/// A copy of `arg` for keeping: arguments are slices of the client's input
/// buffer, and a slice kept for the session's life would keep that whole
/// buffer (a pipeline of large values, say) alive with it.
fn owned(arg: &Bytes) -> Bytes {
    Bytes::copy_from_slice(arg)
}

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
        out: Outbox::new(ctx.ack.clone()),
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
        reply_off: false,
        skip_next: false,
        skipping: false,
        relay: RelayBook::default(),
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
            let flow = if self.skip_next {
                self.handle_skipped(chunk, frame).await
            } else {
                self.handle(chunk, frame).await
            };
            // Keys of a write that got no reply slot of its own (refused
            // here) must not ride on a later, unrelated one.
            self.pending_inv = Invalidation::default();
            if flow == Flow::Stop {
                self.flush_run(chunk).await;
                self.ack_relayed(chunk).await;
                return Flow::Stop;
            }
        }
        self.flush_run(chunk).await;
        self.ack_relayed(chunk).await;
        Flow::Continue
    }

    /// The command after `CLIENT REPLY SKIP`: handled with its reply dropped,
    /// unless it is a `CLIENT REPLY` that sets the mode anew (an `ON`
    /// answers), as in Redis.
    async fn handle_skipped(&mut self, chunk: &Bytes, frame: Option<Range<usize>>) -> Flow {
        self.skip_next = false;
        if local::reply_mode(&self.argv).is_some() {
            return self.handle(chunk, frame).await;
        }
        self.flush_run(chunk).await;
        self.push(Slot::Mute(true));
        self.skipping = true;
        let flow = self.handle(chunk, frame).await;
        self.skipping = false;
        self.flush_run(chunk).await;
        self.push(Slot::Mute(false));
        flow
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
                    match &self.pin {
                        // Among the relay's frames, in its place.
                        Some(pin) if pin.relay => {
                            let _ = pin.conn.send(Op::Inject {
                                reply: e.clone(),
                                subscribed: e,
                            });
                        }
                        _ => self.reply(e),
                    }
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
                self.queue_local(route);
            }
            // ON (or a bad mode, a syntax error) runs at EXEC (see
            // `local_reply`); OFF and SKIP would turn replies off in the
            // middle of EXEC's, as Redis does, and are refused below.
            Route::ClientReply
                if self.pin.as_ref().is_some_and(|p| p.in_multi)
                    && !matches!(
                        local::reply_mode(&self.argv),
                        Some(local::ReplyMode::Off | local::ReplyMode::Skip)
                    ) =>
            {
                self.queue_local(route);
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
                // (Replies come back on; after SKIP, RESET's own stays
                // dropped, as in Redis.)
                if std::mem::take(&mut self.reply_off) {
                    self.push(Slot::Mute(false));
                }
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
            Route::ClientReply | Route::Relay if self.pin.as_ref().is_some_and(|p| p.in_multi) => {
                self.refuse_in_multi(spec);
            }
            Route::ClientReply => self.client_reply(),
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
            | Route::Refuse(_) => {
                self.relay_local(chunk, route, maybe_subscribed, &refused)
                    .await
            }
            // Their effect (the name, the protocol of nearcache's own
            // replies) cannot wait to learn whether Redis would take them:
            // refused while the client may be subscribed.
            Route::ClientSetName | Route::Hello if maybe_subscribed => {
                self.relay_local(chunk, route, maybe_subscribed, &refused)
                    .await
            }
            _ => {
                // Writes so far are acknowledged before anything that may
                // change how Redis answers (CLIENT REPLY, MULTI, RESET…).
                if route != Route::Forward {
                    self.ack_relayed(chunk).await;
                }
                // (CLIENT REPLY here is Redis's to apply.)
                match route {
                    // Queued writes run at EXEC: acknowledged after it.
                    Route::Multi => self.relay.multi = true,
                    Route::EndTransaction => self.relay.multi = false,
                    Route::Select => {
                        if let Some(db) = self.argv.get(1).and_then(|a| parse_i64(a)) {
                            self.db = u32::try_from(db).unwrap_or(self.db);
                        }
                        // Redis may refuse it (out of range, a RESP2
                        // subscriber) or never run it (a transaction that
                        // fails): the database of later writes is then
                        // unknown here.
                        self.relay.db_uncertain = true;
                    }
                    Route::Hello => {
                        if let Some(p) = requested_protocol(&self.argv) {
                            self.proto = p;
                        }
                    }
                    Route::ClientSetName => self.name = self.argv.get(2).map(owned),
                    Route::Relay => self.note_subscribe(),
                    _ => {}
                }
                // A relayed write has no reply slot to carry its keys: they
                // wait for its replies to be counted (see `ack_relayed`).
                // (A command refused for its arity, or queued in MULTI, draws
                // one reply whatever it is.)
                let replies = if matches!(route, Route::WrongArity(_)) {
                    Some(1)
                } else {
                    relay_replies(&self.argv, maybe_subscribed, self.relay.multi)
                };
                match replies {
                    Some(n) => self.relay.due += n,
                    None => self.relay.countable = false,
                }
                let inv = std::mem::take(&mut self.pending_inv);
                self.forward(chunk, frame, true).await;
                self.relay.inv.extend(inv);
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

    /// In a relay, a reply nearcache makes itself stands in for a PING's
    /// answer (see [`Op::Inject`]); `refused` is Redis's answer to a RESP2
    /// subscriber, relayed instead when the PING shows it still is one. A
    /// command that acts at once (KILL, SETNAME, HELLO) is refused outright
    /// while the client may be subscribed.
    async fn relay_local(
        &mut self,
        chunk: &Bytes,
        route: Route,
        maybe_subscribed: bool,
        refused: &impl Fn() -> Bytes,
    ) -> Flow {
        let acts = matches!(
            route,
            Route::ClientKill | Route::ClientSetName | Route::Hello
        );
        let r = if acts && maybe_subscribed {
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
            // (Closing, the reply goes at once and the relay ends with it:
            // the session's last word.)
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

    /// Has the writes relayed since the last acknowledgement invalidated
    /// (locally again, and on peers) once Redis has answered them: an
    /// [`Op::Ack`], which counts the relay's replies. Where they cannot be
    /// counted (see `RelayBook::countable`), or the relay is gone, they are
    /// published now instead, as they are sent.
    async fn ack_relayed(&mut self, chunk: &Bytes) {
        let book = &mut self.relay;
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
        self.flush_run(chunk).await;
        let ack = self.ctx.ack.clone();
        let acknowledged = OnAnswer::new(move || ack.acknowledged(&inv, &mut Vec::new()));
        match &self.pin {
            // (A failed send drops the callback, which runs it.)
            Some(pin) if pin.relay && self.relay.countable => {
                let _ = pin.conn.send(Op::Ack(acknowledged));
            }
            _ => drop(acknowledged),
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
            let replies = self
                .relay
                .countable
                .then(|| std::mem::take(&mut self.relay.due));
            if pin.conn.send(Op::Write { frames, replies }).is_err() {
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

    /// Queues a reply the proxy produced, after everything already queued.
    fn reply(&mut self, bytes: Bytes) {
        self.out.put_bytes(bytes);
    }

    fn push(&mut self, slot: Slot) {
        self.out.push(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
