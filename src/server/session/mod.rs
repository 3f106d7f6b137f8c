//! One client connection: read commands, route each, queue its reply slot.
//!
//! The request path, for every command of a read ([`Session::handle`]):
//! 1. **classify** — the command table and [`route`](super::route) say what
//!    the command is and what the proxy does with it ([`Request::new`]);
//! 2. **admit** — authentication and rate limits (`admit.rs`); a
//!    refusal is delivered by [`Session::refuse`] wherever the mode needs it;
//!    then `store_compressed` (`stored.rs`): values compressed, reads
//!    marked for decompression, raw-byte commands refused;
//! 3. **note writes** — a write's keys leave L1 now, and again on its reply
//!    (`cached.rs`);
//! 4. **dispatch by mode** ([`mode`]) — shared connections and
//!    L1 (`paired.rs`, `cached.rs`), a transaction (`transaction.rs`), a relay
//!    (`relay.rs`); what nearcache answers itself is in `local.rs`, blocking
//!    commands in `blocking.rs`;
//! 5. **respond** — each command's reply has its slot in the
//!    [`outbox`](super::outbox), written in order, as many as are ready in
//!    one write; consecutive forwarded commands of one read share one slot
//!    and one upstream request (`deliver.rs`);
//! 6. **record** — commands are counted by class, and replies timed by path
//!    when they are placed ([`crate::stats`]).
//!
//! Connection state that Redis keeps per connection is kept here instead
//! ([`ClientState`]) so that shared upstream connections stay stateless.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

mod admit;
mod blocking;
mod cached;
mod clients;
mod deliver;
mod info;
mod input;
mod local;
mod mode;
mod paired;
mod relay;
mod stored;
mod transaction;

use crate::acl::Renamed;
use input::{Backlog, Cmd, Input};
use mode::Mode;

use super::directory::{Enrollment, Profile};
use super::outbox::{Outbox, Slot};
use super::request::Request;
use super::route::Route;
use super::transport::{ClientStream, Peer};
use crate::cache::{Invalidation, Viewer};
use crate::context::{Context, Snapshot};
use crate::protocol::reply::Protocol;
use crate::stats::{HotKeySampler, Tally};
use crate::upstream::{Credentials, Lane};

/// Whether the session goes on reading.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// What Redis keeps per connection, kept per client here.
struct ClientState {
    /// nearcache's id for the client (`CLIENT ID`).
    id: u64,
    db: u32,
    proto: Protocol,
    name: Option<Bytes>,
    authed: bool,
    /// `CLIENT NO-EVICT on`.
    no_evict: bool,
    /// The last command run, by its full name.
    last_cmd: &'static str,
    /// The client killed itself (`CLIENT KILL … SKIPME no`): close after the
    /// reply.
    closing: bool,
    /// After a relayed SELECT that Redis may not have run, the database of
    /// later writes is unknown: their keys are dropped in every database
    /// until RESET.
    db_uncertain: bool,
    /// The Redis user the client authenticated as where Redis decides
    /// (`server.auth = "redis"`); None: nearcache's own upstream identity.
    user: Option<Arc<Credentials>>,
    /// The nearcache user the client is (`[[users]]`; `default` until
    /// `AUTH`), whose permissions admission checks.
    acl: Arc<crate::acl::User>,
}

impl ClientState {
    /// Whom L1's replies are for: this protocol, this user.
    #[inline]
    fn viewer(&self) -> Viewer {
        Viewer {
            proto: self.proto,
            user: self.user.as_ref().map_or(0, |u| u.namespace),
        }
    }
}

/// `CLIENT REPLY`'s state (in a relay, Redis applies it instead).
#[derive(Default)]
struct Muting {
    /// `OFF`: replies are dropped.
    off: bool,
    /// `SKIP`: the next command's reply is dropped.
    skip_next: bool,
    /// The command being handled is the skipped one.
    skipping: bool,
}

/// Forwarded commands of the current read not yet sent, and the keys
/// written by what is being handled.
#[derive(Default)]
struct Batch {
    run: Option<deliver::Run>,
    /// Keys the pending run's writes touch, dropped again on its replies.
    run_inv: Invalidation,
    /// Keys the command being handled writes, not yet attached to a request.
    pending_inv: Invalidation,
}

/// Reused buffers, so a request allocates nothing for them.
#[derive(Default)]
struct Scratch {
    /// Cache and flight ids.
    ids: Vec<u8>,
    /// Key positions of a write.
    positions: Vec<(usize, u16)>,
    /// Key positions for the permission check.
    acl_keys: Vec<(usize, u16)>,
    /// An MGET's cached elements.
    mget: Vec<u8>,
}

/// Per-connection state and the request path.
pub struct Session {
    ctx: Arc<Context>,
    /// The rules in force (taken afresh at each read).
    snapshot: Arc<Snapshot>,
    client: ClientState,
    lane: Lane,
    mode: Mode,
    out: Outbox,
    batch: Batch,
    muting: Muting,
    scratch: Scratch,
    /// Counts since the last read, and when that read came.
    tally: Tally,
    read_at: Instant,
    /// The session's entry in the directory, for `CLIENT KILL` and `CLIENT
    /// LIST`, and what it shows of the session (as last published).
    enrollment: Enrollment,
    shown: Profile,
    /// Arguments of the command being parsed, reused.
    argv: Vec<Bytes>,
    /// The client's address, as rate limits key it.
    ip: std::net::IpAddr,
    /// The rate-limit buckets this session uses.
    buckets: crate::limits::SessionBuckets,
    /// Samples of the keys this session reads, for `PROXY HOTKEYS`.
    hot: HotKeySampler,
}

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
pub async fn serve<S: ClientStream>(
    mut stream: S,
    peer: Peer,
    ctx: Arc<Context>,
    id: u64,
    shutdown: watch::Receiver<bool>,
) {
    // `CLIENT KILL` from another client ends the session.
    let (enrollment, mut killed) = ctx.directory.enroll(id, &peer);
    let mut session = Session::new(ctx.clone(), id, enrollment, peer.addr.ip());
    let mut input = Input::new(ctx.limits);
    let idle = ctx.cfg.server.idle_timeout.0;
    let max_pending = ctx.cfg.server.max_pending_replies;
    let mut shutdown = std::pin::pin!(input::shutdown_requested(shutdown));
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
        if reading && session.relay_lost() {
            // (A subscriber may send nothing for hours: noticed here.)
            session.close_lost_relay();
            reading = false;
            continue;
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
        let can_read =
            reading && room > 0 && (backlog == Backlog::None || (held && input.has_room()));
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
                    session.end_relay();
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
                session.end_relay();
                continue;
            }
            _ = input::idle_expired(idle), if can_read && !relaying && session.out.is_empty() => break,
            // (Its sender stays in the directory until a kill sends on it.)
            _ = &mut killed => break,
        }
        input.reserve();
    }
    let _ = stream.shutdown().await;
}

impl Session {
    fn new(ctx: Arc<Context>, id: u64, enrollment: Enrollment, ip: std::net::IpAddr) -> Self {
        ctx.stats
            .requests
            .clients
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Session {
            snapshot: ctx.snapshot.load_full(),
            client: ClientState {
                id,
                db: ctx.upstream.default_db(),
                proto: Protocol::Resp2,
                name: None,
                authed: ctx.snapshot.load().open(),
                no_evict: false,
                last_cmd: Profile::default().cmd,
                closing: false,
                db_uncertain: false,
                user: None,
                acl: ctx.snapshot.load().users.default_user().clone(),
            },
            lane: Lane::new(ctx.upstream.clone(), ctx.default_pool.clone()),
            mode: Mode::Shared,
            out: Outbox::new(ctx.ack.clone(), ctx.stats.clone())
                .closing_on_lost(ctx.cfg.upstream.on_lost == crate::config::OnLost::Close),
            batch: Batch::default(),
            muting: Muting::default(),
            scratch: Scratch::default(),
            tally: Tally::default(),
            read_at: Instant::now(),
            enrollment,
            shown: Profile::default(),
            argv: Vec::with_capacity(8),
            ip,
            buckets: Default::default(),
            hot: HotKeySampler::new(id),
            ctx,
        }
    }

    /// Runs the commands of one read, in order: each is a frame of
    /// `chunk` (its arguments at `ranges`) or an inline command.
    async fn process(&mut self, chunk: &Bytes, cmds: &[Cmd], ranges: &[Range<usize>]) -> Flow {
        self.read_at = Instant::now();
        if !Arc::ptr_eq(&self.snapshot, &*self.ctx.snapshot.load()) {
            self.snapshot = self.ctx.snapshot.load_full();
            // A reload may have changed what the client's user may run.
            self.client.acl = self.snapshot.users.current(&self.client.acl.name);
        }
        let mut flow = Flow::Continue;
        for cmd in cmds {
            let mut argv = std::mem::take(&mut self.argv);
            argv.clear();
            let frame = match cmd {
                Cmd::Resp { frame, args } => {
                    argv.extend(ranges[args.clone()].iter().map(|r| chunk.slice(r.clone())));
                    Some(frame.clone())
                }
                Cmd::Inline(args) => {
                    argv.extend_from_slice(args);
                    None
                }
            };
            let renamed = self.snapshot.fence.rename(&mut argv);
            let frame = if renamed == Renamed::Alias {
                None
            } else {
                frame
            };
            let mut req = Request::new(chunk, frame, argv);
            req.renamed = renamed;
            // Without nearcache's users, who the connection is is Redis's
            // answer (the pool's user, or the client's own in Redis mode).
            if req.route == Route::AclWhoami && !self.snapshot.users.enforced {
                req.route = Route::Forward;
            }
            flow = if self.muting.skip_next {
                self.handle_skipped(&mut req).await
            } else {
                self.handle(&mut req).await
            };
            self.argv = req.into_argv();
            // Keys of a write that got no reply slot of its own (refused
            // here) must not ride on a later, unrelated one.
            self.batch.pending_inv = Invalidation::default();
            if flow == Flow::Stop {
                break;
            }
        }
        self.flush_run().await;
        self.ack_relayed().await;
        self.tally.flush(&self.ctx.stats.requests, self.read_at);
        self.enrollment.touch();
        self.publish_profile();
        flow
    }

    /// The request path for one command, phase by phase.
    async fn handle(&mut self, req: &mut Request<'_>) -> Flow {
        if self.relay_lost() {
            return self.close_lost_relay();
        }
        self.tally.command(req.class());
        // Only forwarded commands join the run of commands waiting to go
        // upstream together. Anything else is answered here or changes the
        // session (SELECT moves it to another database's connection), so the
        // run goes first: its replies come first, on the connection it was
        // read for.
        if req.route != Route::Forward {
            self.flush_run().await;
        }
        // Admit.
        if let Err(e) = self.admit(req).await {
            if req.name() == "exec" {
                return self.refuse_exec(req, e).await;
            }
            self.refuse(e).await;
            return Flow::Continue;
        }
        if let Err(e) = self.store_compressed(req) {
            self.refuse(e).await;
            return Flow::Continue;
        }
        // Note writes.
        if let Some(spec) = req.spec {
            self.client.last_cmd = spec.name;
            self.note_write(req, spec);
        }
        // Ids the client got from nearcache, as Redis knows them.
        if let Err(e) = self.translate_ids(req).await {
            self.refuse(e).await;
            return Flow::Continue;
        }
        // Dispatch by mode.
        match self.mode {
            Mode::Relay(..) => self.relayed(req).await,
            Mode::Transaction(..) => self.queued(req).await,
            Mode::Shared | Mode::Pinned(_) => self.paired(req).await,
        }
    }

    /// Closes the connection once everything before is written.
    fn close(&mut self) -> Flow {
        self.out.push(Slot::Close);
        Flow::Stop
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.hot.flush(&self.ctx.stats.hot_keys);
        self.ctx
            .stats
            .requests
            .clients
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
