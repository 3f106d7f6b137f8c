//! One upstream connection, driven by one task.
//!
//! The task owns the socket. It writes whatever requests are queued in one
//! batch (requests from many clients share one write) and reads replies,
//! handing each request exactly as many reply frames as it announced, in the
//! order the requests were written — Redis answers in order, so that is all the
//! matching there is. RESP3 pushes that arrive on a connection that is not
//! relaying are not replies and are dropped.
//!
//! A connection can switch to *relay* mode (pub/sub, MONITOR, CLIENT REPLY OFF,
//! CLIENT TRACKING): from that point every frame goes to the client as it
//! arrives, because replies no longer pair one-to-one with commands.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::UpstreamError;
use super::backlog::InFlight;
use super::probe::Probe;
pub use super::relay::OnAnswer;
use super::relay::{Acks, MAX_STAND_INS, StandIn, may_answer_a_stand_in, splice_stand_ins};
use super::transport::UpstreamStream;
use crate::protocol::scanner::{FrameKind, ReplyScanner, frame_kind};

/// What a request's sender receives: the reply frames back to back, or the
/// frames that did arrive before the failure.
pub type Replies = Result<Bytes, Failed>;

/// A request that did not get all its replies.
#[derive(Debug, Clone)]
pub struct Failed {
    /// The complete reply frames received before the failure.
    pub partial: Bytes,
    /// How many frames `partial` holds.
    pub got: u32,
    /// What went wrong.
    pub error: UpstreamError,
}

impl Failed {
    /// A failure before any reply frame arrived.
    pub fn nothing(error: UpstreamError) -> Self {
        Self {
            partial: Bytes::new(),
            got: 0,
            error,
        }
    }
}

/// A callback on each relayed frame: false keeps it from the client.
type OnFrame = Box<dyn FnMut(&[u8]) -> bool + Send>;

/// Sees each frame a relaying connection hands over, and may hold it back.
pub struct FrameWatch(pub OnFrame);

impl std::fmt::Debug for FrameWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameWatch")
    }
}

/// Where a request's replies go.
pub type ReplyTx = oneshot::Sender<Replies>;

/// An instruction to a connection task.
#[derive(Debug)]
pub enum Op {
    /// Write `frames` (one or more commands) and collect `replies` reply frames.
    Send {
        /// The commands, RESP-encoded back to back.
        frames: Bytes,
        /// How many reply frames answer them.
        replies: u32,
        /// A blocking command (BLPOP…): exempt from the command timeout, and
        /// the connection closes if its client stops waiting.
        blocking: bool,
        /// Receives the frames.
        tx: ReplyTx,
        /// Its room in the [backlog](super::backlog), given back when its
        /// replies arrive or it fails.
        held: Option<InFlight>,
    },
    /// Write `frames`, then relay every frame from here on to `tx`.
    Relay {
        /// The commands that start relaying (e.g. SUBSCRIBE).
        frames: Bytes,
        /// Receives every frame, in arrival order.
        tx: mpsc::Sender<Bytes>,
        /// How many replies other than pushes `frames` draw, if known (see
        /// [`Op::Ack`]).
        replies: Option<u32>,
        /// Sees every relayed frame first (the session's subscription
        /// counts), and keeps nearcache's own lines out of `MONITOR`.
        watch: FrameWatch,
    },
    /// Write `frames` and expect nothing back (relay mode: replies are relayed).
    Write {
        /// The commands.
        frames: Bytes,
        /// As for [`Op::Relay`]; `None` makes the relay's replies
        /// uncountable from here on.
        replies: Option<u32>,
    },
    /// Relay mode only: a reply the proxy makes itself, handed to the client
    /// in its place among Redis's replies. The connection sends Redis a
    /// `PING <marker>` and relays `bytes` instead of its answer, so the
    /// reply comes after those to every earlier command, and is silenced
    /// exactly when Redis silences that answer (`CLIENT REPLY OFF|SKIP`).
    Inject {
        /// The reply.
        reply: Bytes,
        /// Relayed instead when Redis answers the PING as a RESP2
        /// subscriber (`pong` in an array): the error Redis gives most
        /// commands in that state, which only the PING's answer can tell.
        subscribed: Bytes,
    },
    /// Relay mode only: hand `bytes` to the client at once, then stop
    /// relaying (the client is closing: `CLIENT KILL` of itself).
    InjectLast(Bytes),
    /// Relay mode only: run `then` once Redis has answered every command
    /// written before this (a relayed client's writes: nothing pairs its
    /// replies with its commands). Counted: every reply that is not a push
    /// (RESP3 `>`) answers one command, as the session declared with each
    /// write. Where the count is unknown (MONITOR, `CLIENT REPLY`, RESP2
    /// pub/sub…), `then` runs at once.
    Ack(OnAnswer),
    /// Once every earlier request is answered, return this connection to its
    /// pool's idle list (dedicated connections only). Carries a sender so the
    /// connection stays open until then.
    Release(Conn),
}

impl Op {
    /// A request of `frames` answered by `replies` reply frames, and the
    /// receiver they will arrive on.
    pub fn request(
        frames: Bytes,
        replies: u32,
        blocking: bool,
    ) -> (Op, oneshot::Receiver<Replies>) {
        let (tx, rx) = oneshot::channel();
        let op = Op::Send {
            frames,
            replies,
            blocking,
            tx,
            held: None,
        };
        (op, rx)
    }

    /// The commands and bytes a [`Op::Send`] puts in flight (none for
    /// the others, which relaying connections and releases send).
    pub fn weight(&self) -> Option<(u32, usize)> {
        match self {
            Op::Send {
                frames, replies, ..
            } => Some((*replies, frames.len())),
            _ => None,
        }
    }

    /// Attaches the backlog room a request took.
    pub fn hold(&mut self, room: InFlight) {
        if let Op::Send { held, .. } = self {
            *held = Some(room);
        }
    }
}

/// A handle to a connection task; cheap to clone. When every handle is gone
/// the task closes the connection.
#[derive(Debug, Clone)]
pub struct Conn {
    tx: mpsc::UnboundedSender<Op>,
    redis_id: u64,
    serial: u64,
    epoch: u64,
}

impl Conn {
    /// A number no other connection of this process has (never 0).
    #[inline]
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The upstream's credentials epoch when this connection was made (see
    /// [`super::Upstream::is_current`]).
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Redis's id for this connection (its `CLIENT ID`; 0 if unknown).
    pub fn redis_id(&self) -> u64 {
        self.redis_id
    }

    /// Queues an op; gives it back if the connection is closed.
    #[inline]
    pub fn send(&self, op: Op) -> Result<(), Op> {
        self.tx.send(op).map_err(|e| e.0)
    }

    /// Sends one command and waits for its reply (for the rare requests
    /// whose answer decides what happens next).
    pub async fn ask(&self, frames: Bytes) -> Replies {
        let (op, rx) = Op::request(frames, 1, false);
        let lost = || Failed::nothing(UpstreamError::ConnectionLost);
        self.send(op).map_err(|_| lost())?;
        rx.await.unwrap_or_else(|_| Err(lost()))
    }

    /// True once the connection task has ended.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves when the connection task has ended.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// How a connection behaves.
#[derive(Debug, Clone)]
pub struct ConnOptions {
    /// Fail and close when the oldest (non-blocking) request has waited this long.
    pub command_timeout: Duration,
    /// How to ask Redis whether it still holds a request that has waited
    /// `command_timeout` (see [`super::probe`]); without one, it times out.
    pub probe: Option<Arc<Probe>>,
    /// Where a dedicated connection goes when released; `None` for shared ones.
    pub idle: Option<Arc<IdleList>>,
    /// Requests written and not yet answered, at most; the next ones wait
    /// in the queue (`upstream.max_in_flight_per_connection`).
    pub max_in_flight: usize,
}

/// Idle dedicated connections of one pool.
#[derive(Debug)]
pub struct IdleList {
    conns: std::sync::Mutex<Vec<Conn>>,
    max: usize,
}

impl IdleList {
    /// An empty list that keeps at most `max` connections.
    pub fn new(max: usize) -> Self {
        Self {
            conns: std::sync::Mutex::new(Vec::new()),
            max,
        }
    }

    /// An idle, still-open connection, if any.
    pub fn take(&self) -> Option<Conn> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = conns.pop() {
            if !conn.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    /// How many are idle now (closed ones not counted).
    pub(super) fn len(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.iter().filter(|c| !c.is_closed()).count()
    }

    /// Keeps `conn` for reuse, or drops it (closing it) when the list is full.
    pub(super) fn put(&self, conn: Conn) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| !c.is_closed());
        if conns.len() < self.max {
            conns.push(conn);
        }
    }
}

/// What the task is waiting for, in write order.
enum Pending {
    Replies {
        want: u32,
        tx: ReplyTx,
        since: Instant,
        blocking: bool,
        _held: Option<InFlight>,
    },
    Relay {
        tx: mpsc::Sender<Bytes>,
        /// Replies the proxy made, waiting for their PINGs' answers.
        stand_ins: VecDeque<StandIn>,
        acks: Acks,
        watch: FrameWatch,
    },
    Release(Conn),
}

/// Starts the task for an established (already handshaken) connection.
/// `leftover` holds bytes the handshake read past its own replies; `epoch`
/// is the credentials epoch it authenticated under.
pub fn spawn<S: UpstreamStream>(
    stream: S,
    leftover: BytesMut,
    opts: ConnOptions,
    redis_id: u64,
    epoch: u64,
) -> Conn {
    static SERIAL: AtomicU64 = AtomicU64::new(1);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(stream, leftover, rx, opts, redis_id));
    Conn {
        tx,
        redis_id,
        serial: SERIAL.fetch_add(1, Ordering::Relaxed),
        epoch,
    }
}

/// Bytes of queued requests written in one batch, at most.
const MAX_BATCH_BYTES: usize = 256 * 1024;

async fn run<S: UpstreamStream>(
    stream: S,
    mut rbuf: BytesMut,
    mut rx: mpsc::UnboundedReceiver<Op>,
    opts: ConnOptions,
    redis_id: u64,
) {
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut wbuf = BytesMut::with_capacity(16 * 1024);
    let mut scanner = ReplyScanner::new();
    // Frames already collected for the request at the head of `pending`.
    let mut got: u32 = 0;
    let mut got_bytes: usize = 0;
    // Often enough to notice a timeout within a quarter of it, and a blocked
    // command's client leaving within 200 ms.
    let tick_every =
        (opts.command_timeout / 4).clamp(Duration::from_millis(5), Duration::from_millis(200));
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut relaying = false;
    // Every handle is gone but a relay is still being delivered.
    let mut orphaned = false;
    // A probe asking whether Redis still holds the overdue head request.
    let mut probing: Option<oneshot::Receiver<bool>> = None;

    // Reading, writing and the timeout check each go on while another
    // waits: a Redis that stopped reading (SIGSTOP, a hung host) fills the
    // socket, and a write that blocked the task would keep the timeout from
    // ever failing what waits on it.
    let (mut reader, mut writer) = tokio::io::split(stream);

    let error = loop {
        tokio::select! {
            biased;
            read = reader.read_buf(&mut rbuf) => {
                match read {
                    Ok(0) => break UpstreamError::ConnectionLost,
                    Ok(_) => {}
                    Err(_) => break UpstreamError::ConnectionLost,
                }
                if let Err(e) = deliver(&mut rbuf, &mut scanner, &mut pending, &mut got, &mut got_bytes, &mut relaying, &opts).await {
                    break e;
                }
                if orphaned && !awaited(&pending) {
                    return;
                }
                if rbuf.capacity() - rbuf.len() < 4096 {
                    rbuf.reserve(64 * 1024);
                }
            }
            written = writer.write(&wbuf), if !wbuf.is_empty() => match written {
                Ok(0) | Err(_) => break UpstreamError::ConnectionLost,
                Ok(n) => {
                    wbuf.advance(n);
                    if wbuf.is_empty() {
                        wbuf.clear();
                    }
                }
            },
            op = rx.recv(), if !orphaned
                && pending.len() < opts.max_in_flight
                && wbuf.len() < MAX_BATCH_BYTES => {
                let Some(op) = op else {
                    // Every handle is gone, but what was written is still
                    // answered to whoever waits for it: a session that drops
                    // a dirty pin right after its last commands, a relay whose
                    // RESET's +RESET is on its way. Then the connection closes.
                    if awaited(&pending) {
                        orphaned = true;
                        continue;
                    }
                    return;
                };
                queue(op, &mut wbuf, &mut pending).await;
                // Let every other ready session queue its requests before
                // writing: one write then carries many clients' commands
                // (tokio would otherwise run this task right after the first
                // sender, and batches would stay tiny).
                let mut yielded = false;
                while wbuf.len() < MAX_BATCH_BYTES && pending.len() < opts.max_in_flight {
                    match rx.try_recv() {
                        Ok(op) => queue(op, &mut wbuf, &mut pending).await,
                        Err(_) if !yielded => {
                            yielded = true;
                            tokio::task::yield_now().await;
                        }
                        Err(_) => break,
                    }
                }
                release_ready(&mut pending, &opts);
            }
            held = async {
                match probing.as_mut() {
                    Some(rx) => rx.await,
                    None => std::future::pending().await,
                }
            }, if probing.is_some() => {
                probing = None;
                match held {
                    // Redis is still working on it: the wait goes on, and
                    // is looked at again a command_timeout from now.
                    Ok(true) => {
                        if let Some(Pending::Replies { since, .. }) = pending.front_mut() {
                            *since = Instant::now();
                        }
                    }
                    _ => break UpstreamError::Timeout(opts.command_timeout),
                }
            }
            _ = tick.tick(), if !pending.is_empty() => {
                match check_head(&pending, &opts) {
                    Head::Fine => {}
                    Head::Overdue => match (&opts.probe, redis_id) {
                        (Some(probe), id) if id != 0 => {
                            if probing.is_none() {
                                let (tx, rx) = oneshot::channel();
                                let probe = probe.clone();
                                tokio::spawn(async move {
                                    let _ = tx.send(probe.holds(id).await);
                                });
                                probing = Some(rx);
                            }
                        }
                        _ => break UpstreamError::Timeout(opts.command_timeout),
                    },
                    Head::Dead(e) => break e,
                }
                if orphaned && !awaited(&pending) {
                    return;
                }
            }
        }
    };
    // Fail everything in flight; the head keeps what did arrive.
    let mut first = true;
    for p in pending.drain(..) {
        if let Pending::Replies { tx, .. } = p {
            let (partial, n) = if first && got > 0 {
                (rbuf.split_to(got_bytes).freeze(), got)
            } else {
                (Bytes::new(), 0)
            };
            let _ = tx.send(Err(Failed {
                partial,
                got: n,
                error: error.clone(),
            }));
        }
        first = false;
    }
}

/// Adds one operation's bytes to the write buffer and its reply slot to
/// `pending`.
async fn queue(op: Op, wbuf: &mut BytesMut, pending: &mut VecDeque<Pending>) {
    match op {
        Op::Send {
            frames,
            replies,
            blocking,
            tx,
            held,
        } => {
            wbuf.extend_from_slice(&frames);
            if replies == 0 {
                let _ = tx.send(Ok(Bytes::new()));
            } else {
                pending.push_back(Pending::Replies {
                    want: replies,
                    tx,
                    since: Instant::now(),
                    blocking,
                    _held: held,
                });
            }
        }
        Op::Relay {
            frames,
            tx,
            replies,
            watch,
        } => {
            wbuf.extend_from_slice(&frames);
            let mut acks = Acks::default();
            acks.expect(replies);
            pending.push_back(Pending::Relay {
                tx,
                stand_ins: VecDeque::new(),
                acks,
                watch,
            });
        }
        Op::Write { frames, replies } => {
            wbuf.extend_from_slice(&frames);
            if let Some(Pending::Relay { acks, .. }) = pending.back_mut() {
                acks.expect(replies);
            }
        }
        Op::Release(conn) => pending.push_back(Pending::Release(conn)),
        Op::Inject { reply, subscribed } => {
            if let Some(Pending::Relay {
                stand_ins, acks, ..
            }) = pending.back_mut()
            {
                let (stand_in, ping) = StandIn::new(reply, subscribed);
                // Under CLIENT REPLY OFF no answer ever comes to drop them:
                // a bound on memory (a client with more of nearcache's own
                // replies than this in flight at once on one relay would get
                // the oldest as Redis's answer to its PING).
                if stand_ins.len() == MAX_STAND_INS {
                    stand_ins.pop_front();
                }
                stand_ins.push_back(stand_in);
                acks.expect(Some(1));
                wbuf.extend_from_slice(&ping);
            }
        }
        // (Without a relay, `then` is dropped: it runs at once.)
        Op::Ack(then) => {
            if let Some(Pending::Relay { acks, .. }) = pending.back_mut() {
                acks.ack(then);
            }
        }
        Op::InjectLast(bytes) => {
            if let Some(Pending::Relay { tx, .. }) = pending.back() {
                let _ = tx.send(bytes).await;
            }
            // Dropping the sender ends the client's relay once it has taken
            // every frame before this.
            if let Some(Pending::Relay { .. }) = pending.back() {
                pending.pop_back();
            }
        }
    }
}

/// Hands complete frames in `rbuf` to the requests waiting for them.
async fn deliver(
    rbuf: &mut BytesMut,
    scanner: &mut ReplyScanner,
    pending: &mut VecDeque<Pending>,
    got: &mut u32,
    got_bytes: &mut usize,
    relaying: &mut bool,
    opts: &ConnOptions,
) -> Result<(), UpstreamError> {
    loop {
        let Some(len) = scanner
            .scan(&rbuf[*got_bytes..])
            .map_err(|_| UpstreamError::InvalidReply)?
        else {
            return Ok(());
        };
        let start = *got_bytes;
        if *relaying {
            let frame = rbuf.split_to(len).freeze();
            // Only RESET answers `+RESET`: after it the connection's state is
            // gone and so is the reason to relay; the session starts afresh.
            let reset = &frame[..] == b"+RESET\r\n";
            if let Some(Pending::Relay {
                tx,
                stand_ins,
                acks,
                watch,
            }) = pending.front_mut()
            {
                // (Before the client can see it, and answer it.)
                if !(watch.0)(&frame) {
                    continue;
                }
                acks.saw(&frame);
                // A stand-in's PING answered: earlier stand-ins whose answers
                // Redis silenced (CLIENT REPLY OFF|SKIP) are dropped.
                let answered = if stand_ins.is_empty() || !may_answer_a_stand_in(&frame) {
                    None
                } else {
                    stand_ins.iter().position(|s| s.answers(&frame))
                };
                let frame = match answered {
                    Some(at) => {
                        stand_ins.drain(..at);
                        match stand_ins.pop_front() {
                            Some(s) => s.into_reply(&frame),
                            None => frame,
                        }
                    }
                    None => splice_stand_ins(&frame, stand_ins).unwrap_or(frame),
                };
                if tx.send(frame).await.is_err() {
                    // The client is gone; so is the point of this connection.
                    return Err(UpstreamError::ConnectionLost);
                }
            }
            if reset {
                return Err(UpstreamError::ConnectionLost);
            }
            continue;
        }
        match pending.front_mut() {
            Some(Pending::Relay { .. }) => {
                *relaying = true;
                // Re-scan this frame in relay mode.
                *scanner = ReplyScanner::new();
                continue;
            }
            Some(Pending::Replies { want, .. })
                if frame_kind(&rbuf[start..]) == FrameKind::Reply =>
            {
                *got += 1;
                *got_bytes += len;
                if *got == *want {
                    let frames = rbuf.split_to(*got_bytes).freeze();
                    *got = 0;
                    *got_bytes = 0;
                    if let Some(Pending::Replies { tx, .. }) = pending.pop_front() {
                        let _ = tx.send(Ok(frames));
                    }
                    release_ready(pending, opts);
                }
            }
            _ => {
                // A push, or a frame nobody asked for: not a reply. Cut it out
                // without disturbing frames already collected before it.
                let mut tail = rbuf.split_off(start);
                tail.advance(len);
                rbuf.unsplit(tail);
            }
        }
    }
}

/// Whether anyone still waits for a reply or a relayed frame.
fn awaited(pending: &VecDeque<Pending>) -> bool {
    pending.iter().any(|p| match p {
        Pending::Replies { tx, .. } => !tx.is_closed(),
        Pending::Relay { tx, .. } => !tx.is_closed(),
        Pending::Release(_) => false,
    })
}

/// Returns released connections whose earlier replies have all arrived.
fn release_ready(pending: &mut VecDeque<Pending>, opts: &ConnOptions) {
    while let Some(Pending::Release(_)) = pending.front() {
        if let Some(Pending::Release(conn)) = pending.pop_front() {
            if let Some(idle) = &opts.idle {
                idle.put(conn);
            }
        }
    }
}

/// How the oldest request stands.
enum Head {
    Fine,
    /// It has waited `command_timeout`: Redis is asked whether it holds it.
    Overdue,
    /// The connection is done for.
    Dead(UpstreamError),
}

/// Whether the oldest request has waited too long, or a blocked one has
/// nobody waiting for it any more.
fn check_head(pending: &VecDeque<Pending>, opts: &ConnOptions) -> Head {
    match pending.front() {
        Some(Pending::Replies {
            tx, blocking: true, ..
        }) => {
            // A blocked command whose client left: the only way to unblock it
            // is to close the connection.
            if tx.is_closed() {
                Head::Dead(UpstreamError::ConnectionLost)
            } else {
                Head::Fine
            }
        }
        Some(Pending::Replies { since, .. }) if since.elapsed() > opts.command_timeout => {
            Head::Overdue
        }
        Some(Pending::Relay { tx, .. }) if tx.is_closed() => {
            Head::Dead(UpstreamError::ConnectionLost)
        }
        _ => Head::Fine,
    }
}
