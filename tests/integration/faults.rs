//! Fault injection: bad client input and upstream failures, each test named
//! after the promise of the failure policy (DESIGN.md) it guards.
//!
//! - Bad input gets a RESP error where one can be sent, closes only the
//!   offending client's connection, and never disturbs another client (every
//!   test keeps a [`Bystander`] busy on the same proxy and checks it).
//! - An upstream that dies, hangs or was never there gets quick
//!   `-ERR upstream …` replies, never a hang, and the proxy recovers on its own.
//!
//! Raw sockets throughout: the point is to send what a well-behaved client
//! library never would, and to see exactly what comes back. The small RESP
//! client here ([`Client`], [`Reply`]) is shared with `lifecycle.rs`.

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nearcache::config::{ByteSize, Duration as ConfigDuration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, block_in_place};

use crate::support::{
    RedisServer, TestProxy, UPSTREAM_CONNECT_FAILED, UPSTREAM_LOST, config_for, proxy_stats,
};

// ---------------------------------------------------------------------------
// A minimal RESP client for tests.
// ---------------------------------------------------------------------------

/// How long any single reply may take before a test calls it a hang.
pub(crate) const REPLY_LIMIT: Duration = Duration::from_secs(5);

/// A reply, decoded just enough to assert on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `+…`
    Status(String),
    /// `-…` (and RESP3 `!` blob errors)
    Error(String),
    /// `:…`
    Int(i64),
    /// `$…`; `None` for the RESP2 null bulk.
    Bulk(Option<Vec<u8>>),
    /// `*…`, and RESP3 maps (flattened to key, value, …), sets and pushes;
    /// `None` for the RESP2 null array.
    Array(Option<Vec<Reply>>),
    /// Any other RESP3 scalar (null, boolean, double, big number), as its line.
    Other(String),
}

impl Reply {
    /// A bulk string reply holding `s`.
    pub(crate) fn bulk(s: &str) -> Reply {
        Reply::Bulk(Some(s.as_bytes().to_vec()))
    }

    /// A status reply `+s`.
    pub(crate) fn status(s: &str) -> Reply {
        Reply::Status(s.to_owned())
    }

    /// The error text, if this is an error.
    pub(crate) fn error(&self) -> Option<&str> {
        match self {
            Reply::Error(e) => Some(e),
            _ => None,
        }
    }
}

/// RESP-encodes a command whose arguments are text.
pub(crate) use crate::compat::encode_text as encode;

/// Decodes one reply from the start of `buf`; `None` if it is incomplete.
/// Panics on bytes that are not RESP: the proxy must never send those.
pub(crate) fn decode(buf: &[u8]) -> Option<(Reply, usize)> {
    let nl = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = String::from_utf8_lossy(&buf[1..nl]).into_owned();
    let after = nl + 2;
    let number = |line: &str| -> i64 {
        line.parse()
            .unwrap_or_else(|_| panic!("bad RESP length/integer {line:?}"))
    };
    match buf[0] {
        b'+' => Some((Reply::Status(line), after)),
        b'-' => Some((Reply::Error(line), after)),
        b':' => Some((Reply::Int(number(&line)), after)),
        b'$' | b'!' | b'=' => {
            let n = number(&line);
            if n < 0 {
                return Some((Reply::Bulk(None), after));
            }
            let end = after + usize::try_from(n).unwrap();
            if buf.len() < end + 2 {
                return None;
            }
            assert_eq!(&buf[end..end + 2], b"\r\n", "bulk not terminated by CRLF");
            let data = buf[after..end].to_vec();
            let reply = if buf[0] == b'!' {
                Reply::Error(String::from_utf8_lossy(&data).into_owned())
            } else {
                Reply::Bulk(Some(data))
            };
            Some((reply, end + 2))
        }
        b'*' | b'~' | b'>' | b'%' => {
            let n = number(&line);
            if n < 0 {
                return Some((Reply::Array(None), after));
            }
            let count = usize::try_from(n).unwrap() * if buf[0] == b'%' { 2 } else { 1 };
            let mut items = Vec::with_capacity(count.min(1024));
            let mut at = after;
            for _ in 0..count {
                let (item, used) = decode(&buf[at..])?;
                items.push(item);
                at += used;
            }
            Some((Reply::Array(Some(items)), at))
        }
        b'_' | b'#' | b',' | b'(' => Some((Reply::Other(line), after)),
        other => panic!(
            "not a RESP reply: starts with {:?} in {:?}",
            char::from(other),
            String::from_utf8_lossy(&buf[..buf.len().min(200)])
        ),
    }
}

/// Decodes every reply in `buf`, which must hold whole replies only.
pub(crate) fn decode_all(mut buf: &[u8]) -> Vec<Reply> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (reply, used) = decode(buf).unwrap_or_else(|| {
            panic!(
                "incomplete reply at the end: {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(200)])
            )
        });
        out.push(reply);
        buf = &buf[used..];
    }
    out
}

/// Why no reply came.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The peer closed (or reset) the connection.
    Closed,
    /// Nothing arrived in time.
    TimedOut,
}

/// A raw RESP connection to 127.0.0.1.
pub(crate) struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    port: u16,
}

impl Client {
    /// Connects, failing the test if that takes longer than [`REPLY_LIMIT`].
    pub(crate) async fn connect(port: u16) -> Client {
        let stream =
            tokio::time::timeout(REPLY_LIMIT, TcpStream::connect((Ipv4Addr::LOCALHOST, port)))
                .await
                .unwrap_or_else(|_| panic!("connecting to 127.0.0.1:{port} timed out"))
                .unwrap_or_else(|e| panic!("connecting to 127.0.0.1:{port}: {e}"));
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
            port,
        }
    }

    /// Writes `bytes`; Err if the connection is gone.
    pub(crate) async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Writes `bytes`, failing the test if the connection is gone.
    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes)
            .await
            .unwrap_or_else(|e| panic!("writing to 127.0.0.1:{}: {e}", self.port));
    }

    /// The next reply, or why there is none within `limit`.
    pub(crate) async fn next(&mut self, limit: Duration) -> Result<Reply, Ended> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some((reply, used)) = decode(&self.buf) {
                self.buf.drain(..used);
                return Ok(reply);
            }
            self.buf.reserve(64 * 1024);
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(Ended::TimedOut),
                Ok(Ok(0) | Err(_)) => return Err(Ended::Closed),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next reply; a missing one (hang or close) fails the test.
    pub(crate) async fn read(&mut self) -> Reply {
        match self.next(REPLY_LIMIT).await {
            Ok(reply) => reply,
            Err(e) => panic!("no reply from 127.0.0.1:{}: {e:?}", self.port),
        }
    }

    /// Sends one command and returns its reply.
    pub(crate) async fn cmd(&mut self, args: &[&str]) -> Reply {
        self.send(&encode(args)).await;
        self.read().await
    }

    /// Waits for the peer to close the connection: true if it did within
    /// `limit`, false if it is still open. A reply meanwhile fails the test.
    pub(crate) async fn closed_within(&mut self, limit: Duration) -> bool {
        match self.next(limit).await {
            Err(Ended::Closed) => true,
            Err(Ended::TimedOut) => false,
            Ok(reply) => panic!("expected the connection to close, got {reply:?}"),
        }
    }
}

/// Polls PING on `client` until the proxy answers PONG again; meanwhile every
/// answer must be an `ERR upstream …` error.
pub(crate) async fn wait_for_pong(client: &mut Client, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        match client.cmd(&["PING"]).await {
            Reply::Status(s) if s == "PONG" => return,
            Reply::Error(e) if e.starts_with("ERR upstream") => {}
            other => panic!("unexpected reply while waiting for recovery: {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "proxy did not recover within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Bad input.
// ---------------------------------------------------------------------------

/// A well-behaved client on the same proxy as a misbehaving one. It does a
/// SET/GET round trip when it starts, keeps doing them (paced) on the same
/// connection while the test runs, and does one more when it finishes; any
/// wrong or missing reply fails the test.
struct Bystander {
    stop: Arc<AtomicBool>,
    task: JoinHandle<(Client, u64)>,
}

impl Bystander {
    /// Bounds the background loop even if `finish` is never called.
    const MAX_ROUNDS: u64 = 20_000;

    async fn start(port: u16) -> Bystander {
        let mut client = Client::connect(port).await;
        round_trip(&mut client, 0).await;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut rounds = 0;
            while rounds < Self::MAX_ROUNDS && !flag.load(Ordering::Relaxed) {
                rounds += 1;
                round_trip(&mut client, rounds).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (client, rounds)
        });
        Bystander { stop, task }
    }

    /// Stops the loop, checks it never failed, and does a last round trip.
    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut client, _rounds) = tokio::time::timeout(REPLY_LIMIT, self.task)
            .await
            .expect("bystander loop stops")
            .expect("bystander kept getting correct replies");
        round_trip(&mut client, u64::MAX).await;
    }
}

async fn round_trip(client: &mut Client, n: u64) {
    let value = format!("value-{n}");
    assert_eq!(
        client.cmd(&["SET", "bystander", &value]).await,
        Reply::status("OK")
    );
    assert_eq!(client.cmd(&["GET", "bystander"]).await, Reply::bulk(&value));
}

/// Sends `input` on a fresh connection and returns everything the proxy
/// writes back until it closes the connection. Writing runs in its own task
/// and its errors are ignored: the proxy may stop reading and close long
/// before all of `input` is sent. With `half_close`, our side then shuts its
/// write half (for input that need not end in a protocol error); otherwise
/// the connection stays open, so a close can only come from the proxy.
/// Fails the test if the connection is still open after [`REPLY_LIMIT`].
async fn answer_to(port: u16, input: Vec<u8>, half_close: bool) -> Vec<u8> {
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&input).await;
        if half_close {
            let _ = wr.shutdown().await;
        }
        wr
    });
    let mut out = Vec::new();
    let read = tokio::time::timeout(REPLY_LIMIT, async {
        loop {
            out.reserve(16 * 1024);
            match rd.read_buf(&mut out).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the proxy kept the connection open; it sent {:?}",
        String::from_utf8_lossy(&out)
    );
    let _ = tokio::time::timeout(REPLY_LIMIT, writer).await;
    out
}

/// Sends `input` from a fresh client while a [`Bystander`] works on the same
/// proxy: the client must get exactly `expected` and then be disconnected by
/// the proxy, and the bystander must not notice.
async fn assert_rejected(proxy: &TestProxy, input: Vec<u8>, expected: &str) {
    let bystander = Bystander::start(proxy.port()).await;
    let got = answer_to(proxy.port(), input, false).await;
    assert_eq!(String::from_utf8_lossy(&got), expected);
    bystander.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_resp_gets_protocol_error_and_only_that_client_is_closed() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    assert_rejected(
        &proxy,
        b"*2\r\n$3\r\nGET\r\n:1\r\n".to_vec(),
        "-ERR Protocol error: expected '$', got ':'\r\n",
    )
    .await;
    // Commands before the bad frame, in the same packet, are answered first.
    let mut input = encode(&["SET", "before-error", "1"]);
    input.extend_from_slice(b"*2\r\n$3\r\nGET\r\n:1\r\n");
    assert_rejected(
        &proxy,
        input,
        "+OK\r\n-ERR Protocol error: expected '$', got ':'\r\n",
    )
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_length_of_2_pow_40_is_an_invalid_bulk_length() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    assert_rejected(
        &proxy,
        b"*2\r\n$3\r\nGET\r\n$1099511627776\r\n".to_vec(),
        "-ERR Protocol error: invalid bulk length\r\n",
    )
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multibulk_length_beyond_max_args_is_an_invalid_multibulk_length() {
    let redis = RedisServer::start();
    // A configured limit: exactly max_args arguments pass, one more does not.
    let mut cfg = config_for(&redis);
    cfg.server.max_args = 8;
    let proxy = TestProxy::start_with(cfg).await;
    let mut at_limit = Client::connect(proxy.port()).await;
    let del = ["DEL", "a", "b", "c", "d", "e", "f", "g"];
    assert_eq!(at_limit.cmd(&del).await, Reply::Int(0));
    assert_rejected(
        &proxy,
        b"*9\r\n$3\r\nDEL\r\n".to_vec(),
        "-ERR Protocol error: invalid multibulk length\r\n",
    )
    .await;
    assert_eq!(at_limit.cmd(&del).await, Reply::Int(0));
    proxy.shutdown().await;

    // The default limit is Redis's: 1024 * 1024 arguments.
    let proxy = TestProxy::start(&redis).await;
    assert_rejected(
        &proxy,
        b"*1048577\r\n".to_vec(),
        "-ERR Protocol error: invalid multibulk length\r\n",
    )
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_nesting_is_rejected_without_recursion() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    // 100 000 levels: a recursive decoder would overflow its stack.
    assert_rejected(
        &proxy,
        b"*1\r\n".repeat(100_000),
        "-ERR Protocol error: expected '$', got '*'\r\n",
    )
    .await;
    proxy.shutdown().await;
}

/// xorshift64*: a fixed-seed byte source, so a failing round can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 56) as u8).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_garbage_gets_only_error_replies_and_never_disturbs_others() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let bystander = Bystander::start(proxy.port()).await;
    let mut rng = XorShift(0x5EED_1234_ABCD_0001);
    for round in 0..12 {
        let len = 1 + (rng.next() % (48 * 1024)) as usize;
        let mut garbage = rng.bytes(len);
        // Odd rounds look like RESP at first glance, even ones like inline text.
        if round % 2 == 1 {
            garbage[0] = b'*';
        }
        // Random bytes need not end in a protocol error (a line can be an
        // unknown inline command), so our side ends the input itself.
        let got = answer_to(proxy.port(), garbage, true).await;
        for reply in decode_all(&got) {
            assert!(
                matches!(reply, Reply::Error(_)),
                "round {round}: garbage got a non-error reply {reply:?}"
            );
        }
    }
    bystander.finish().await;
    let mut fresh = Client::connect(proxy.port()).await;
    assert_eq!(fresh.cmd(&["PING"]).await, Reply::status("PONG"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_line_over_64_kib_is_too_big_an_inline_request() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    assert_rejected(
        &proxy,
        vec![b'a'; 64 * 1024 + 100],
        "-ERR Protocol error: too big inline request\r\n",
    )
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbalanced_quotes_inline_are_a_protocol_error() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    assert_rejected(
        &proxy,
        b"SET k \"abc\r\n".to_vec(),
        "-ERR Protocol error: unbalanced quotes in request\r\n",
    )
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_over_max_bulk_bytes_is_rejected_and_one_at_the_limit_passes() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.server.max_bulk_bytes = ByteSize(1024);
    let proxy = TestProxy::start_with(cfg).await;
    let mut at_limit = Client::connect(proxy.port()).await;
    let max = "m".repeat(1024);
    assert_eq!(
        at_limit.cmd(&["SET", "big", &max]).await,
        Reply::status("OK")
    );
    let mut over = b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$1025\r\n".to_vec();
    over.extend_from_slice(&[b'x'; 1025]);
    over.extend_from_slice(b"\r\n");
    assert_rejected(&proxy, over, "-ERR Protocol error: invalid bulk length\r\n").await;
    // The rejected SET did not reach Redis.
    assert_eq!(at_limit.cmd(&["GET", "big"]).await, Reply::bulk(&max));
    proxy.shutdown().await;
}

/// A connection the proxy accepted (answers PING), polling while the
/// proxy refuses with "max number of clients reached".
pub(crate) async fn accepted_client(port: u16) -> Client {
    let deadline = Instant::now() + REPLY_LIMIT;
    loop {
        let mut client = Client::connect(port).await;
        if client.try_send(&encode(&["PING"])).await.is_ok() {
            match client.next(REPLY_LIMIT).await {
                Ok(Reply::Status(s)) if s == "PONG" => return client,
                Ok(Reply::Error(e)) if e == "ERR max number of clients reached" => {}
                Err(Ended::Closed) => {}
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert!(Instant::now() < deadline, "no client slot came free");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_command_then_disconnect_frees_the_session() {
    let redis = RedisServer::start();
    // Room for the bystander and one more: a session that outlived its
    // client would keep every later client out.
    let mut cfg = config_for(&redis);
    cfg.server.max_clients = 2;
    let proxy = TestProxy::start_with(cfg).await;
    // Until the previous half command's session has ended.
    proxy.expect_log("max_clients reached; refusing client");
    let port = proxy.port();
    let bystander = Bystander::start(port).await;
    let halves: [&[u8]; 4] = [
        b"*2\r\n$3\r\nGET\r\n$4\r\nha",
        b"*3\r\n$3\r\nSET\r\n$4\r\nhalf\r\n$100\r\nabc",
        b"*3\r\n$3\r\nSET\r\n$4\r\nhalf\r\n$1",
        b"SET half v",
    ];
    for half in halves {
        // Accepted means the previous half-command session has ended.
        let mut client = accepted_client(port).await;
        client.send(half).await;
        drop(client);
    }
    drop(accepted_client(port).await);
    bystander.finish().await;
    // No half command reached Redis.
    let exists: i64 = redis::cmd("EXISTS")
        .arg("half")
        .query(&mut redis.direct())
        .unwrap();
    assert_eq!(exists, 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_pipelines_without_reading_is_throttled_and_others_keep_working() {
    const COMMANDS: u64 = 10_000;
    let redis = RedisServer::start();
    // Default settings: what a deployment gets.
    let proxy = TestProxy::start(&redis).await;
    let port = proxy.port();
    let pending_limit = config_for(&redis).server.max_pending_replies as u64;
    // 16 KiB replies: all 10 000 buffered in the proxy would be 160 MiB.
    let value = "v".repeat(16 * 1024);
    let _: () = redis::cmd("SET")
        .arg("big")
        .arg(&value)
        .query(&mut redis.direct())
        .unwrap();

    let hog = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .unwrap();
    let (mut hog_rd, mut hog_wr) = hog.into_split();
    let pipeline = encode(&["GETRANGE", "big", "0", "-1"]).repeat(COMMANDS as usize);
    let hog_writer = tokio::spawn(async move {
        // Blocks once the proxy stops reading; finishes once the hog reads.
        hog_wr.write_all(&pipeline).await.unwrap();
        hog_wr
    });
    let bystander = Bystander::start(port).await;

    // Wait until the number of GETRANGEs reaching Redis stops moving (10
    // polls, 500 ms, without change). If the proxy never stops reading, that
    // happens only once all of them went through. Each one forwarded is a
    // reply the proxy holds (or has handed to the socket buffers).
    let mut forwarded = u64::MAX;
    let mut still = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while still < 10 {
        assert!(Instant::now() < deadline, "GETRANGE count never settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = block_in_place(|| redis.calls("getrange"));
        if now == forwarded {
            still += 1;
        } else {
            (forwarded, still) = (now, 0);
        }
    }
    // The other client worked all along.
    bystander.finish().await;

    // Nothing was lost: once the hog reads, all replies arrive, in order.
    let reader = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = Vec::new();
        let mut seen = 0;
        while seen < COMMANDS {
            buf.reserve(256 * 1024);
            let n = hog_rd.read_buf(&mut buf).await.unwrap();
            assert!(n > 0, "proxy closed the hog after {seen} replies");
            let mut at = 0;
            while let Some((reply, used)) = decode(&buf[at..]) {
                assert_eq!(reply, Reply::bulk(&value), "reply {seen}");
                at += used;
                seen += 1;
            }
            buf.drain(..at);
        }
    })
    .await;
    assert!(reader.is_ok(), "the hog's replies did not all arrive");
    tokio::time::timeout(REPLY_LIMIT, hog_writer)
        .await
        .expect("the hog's pipeline was fully read by the proxy")
        .unwrap();
    proxy.shutdown().await;

    // The bound: `server.max_pending_replies` outstanding replies, plus what
    // the kernel's socket buffers hold (allowance: 16 MiB of replies, more
    // than Linux loopback buffers grow to).
    let allowance = (16 << 20) / value.len() as u64;
    assert!(
        forwarded <= pending_limit + allowance,
        "the proxy read and forwarded {forwarded} of {COMMANDS} commands from a client that \
         reads nothing (bound: max_pending_replies {pending_limit} + {allowance} in socket \
         buffers), so it buffers their replies without bound"
    );
}

// ---------------------------------------------------------------------------
// Upstream failures.
// ---------------------------------------------------------------------------

/// Works around a harness bug: `RedisServer::start_with` creates the server's
/// temp dir inside another temp dir that it drops on return, so the server's
/// `--dir` is gone and `restart()` fails. This finds the directory from the
/// running server's `logfile` setting and recreates it before restarting (and
/// removes what it recreated afterwards).
struct RestartDir {
    dir: std::path::PathBuf,
    created: Option<std::path::PathBuf>,
}

impl RestartDir {
    fn of(redis: &RedisServer) -> RestartDir {
        let kv: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("logfile")
            .query(&mut redis.direct())
            .unwrap();
        let dir = std::path::Path::new(&kv[1]).parent().unwrap().to_owned();
        RestartDir { dir, created: None }
    }

    fn restart(&mut self, redis: &mut RedisServer) {
        if !self.dir.exists() {
            self.created = self.dir.parent().map(|p| p.to_owned());
            std::fs::create_dir_all(&self.dir).unwrap();
        }
        redis.restart();
    }
}

impl Drop for RestartDir {
    fn drop(&mut self) {
        if let Some(parent) = &self.created {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// What a load worker saw.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    upstream_errors: u64,
}

/// A worker pipelining 10 SET/GET pairs per round on its own keys until told
/// to stop (or a bounded number of rounds). Every reply must be the right
/// answer or an `ERR upstream …` error, and arrive within [`REPLY_LIMIT`].
fn load_worker(
    port: u16,
    worker: usize,
    stop: Arc<AtomicBool>,
    progress: mpsc::UnboundedSender<()>,
) -> JoinHandle<Tally> {
    tokio::spawn(async move {
        let mut client = Client::connect(port).await;
        let mut tally = Tally::default();
        for round in 0..5_000u32 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let value = format!("w{worker}-r{round}");
            let mut batch = Vec::new();
            for i in 0..10 {
                let key = format!("load:{worker}:{i}");
                batch.extend(encode(&["SET", &key, &value]));
                batch.extend(encode(&["GET", &key]));
            }
            client.send(&batch).await;
            for i in 0..20 {
                let expected = if i % 2 == 0 {
                    Reply::status("OK")
                } else {
                    Reply::bulk(&value)
                };
                match client.read().await {
                    r if r == expected => tally.ok += 1,
                    Reply::Error(e) if e.starts_with("ERR upstream") => tally.upstream_errors += 1,
                    other => panic!("worker {worker}: unexpected reply {other:?}"),
                }
            }
            let _ = progress.send(());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tally
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_load_every_request_answered_and_proxy_recovers_on_restart() {
    let mut redis = RedisServer::start();
    let mut dir = RestartDir::of(&redis);
    let mut cfg = config_for(&redis);
    // Every request answered: the in-flight ones with an error, not a
    // close (the default, tested with real clients in `clients`); and a
    // short wait for the reconnect, so "fast" below is well under 1 s.
    cfg.upstream.on_lost = nearcache::config::OnLost::Error;
    cfg.upstream.connect_timeout = ConfigDuration(Duration::from_millis(300));
    let proxy = TestProxy::start_with(cfg).await;
    proxy
        .expect_log(UPSTREAM_LOST)
        .expect_log(UPSTREAM_CONNECT_FAILED);
    let port = proxy.port();
    let stop = Arc::new(AtomicBool::new(false));
    let (progress_tx, mut progress) = mpsc::unbounded_channel();
    let workers: Vec<_> = (0..4)
        .map(|w| load_worker(port, w, stop.clone(), progress_tx.clone()))
        .collect();
    drop(progress_tx);
    let mut probe = Client::connect(port).await;
    assert_eq!(probe.cmd(&["PING"]).await, Reply::status("PONG"));

    // Kill once the load is flowing.
    for _ in 0..20 {
        tokio::time::timeout(REPLY_LIMIT, progress.recv())
            .await
            .expect("load makes progress")
            .expect("workers alive");
    }
    block_in_place(|| redis.kill());
    // In-flight and later pipelines keep being answered.
    for _ in 0..20 {
        tokio::time::timeout(REPLY_LIMIT, progress.recv())
            .await
            .expect("load keeps being answered after the kill")
            .expect("workers alive");
    }

    // New requests during the outage fail fast. Right after the kill a
    // request may still meet the dying connection ("connection lost"); once
    // the pool has noticed, it is "unavailable", at once.
    let deadline = Instant::now() + REPLY_LIMIT;
    loop {
        let started = Instant::now();
        let reply = probe.cmd(&["GET", "probe"]).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "slow: {reply:?}"
        );
        let e = reply.error().expect("an error while upstream is down");
        assert!(e.starts_with("ERR upstream"), "{e}");
        if e.starts_with("ERR upstream unavailable") {
            break;
        }
        assert!(Instant::now() < deadline, "never 'unavailable': {e}");
    }
    for _ in 0..10 {
        let started = Instant::now();
        let reply = probe.cmd(&["SET", "probe", "x"]).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "slow: {reply:?}"
        );
        assert!(
            reply
                .error()
                .is_some_and(|e| e.starts_with("ERR upstream unavailable")),
            "{reply:?}"
        );
    }

    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    for w in workers {
        let t = tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("worker finishes")
            .expect("worker got every reply, each valid");
        total.ok += t.ok;
        total.upstream_errors += t.upstream_errors;
    }
    assert!(total.ok > 0 && total.upstream_errors > 0, "{total:?}");

    // Back without restarting the proxy, on the same client connection.
    block_in_place(|| dir.restart(&mut redis));
    wait_for_pong(&mut probe, Duration::from_secs(10)).await;
    assert_eq!(
        probe.cmd(&["SET", "after", "restart"]).await,
        Reply::status("OK")
    );
    let v: String = redis::cmd("GET")
        .arg("after")
        .query(&mut redis.direct())
        .unwrap();
    assert_eq!(v, "restart");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_started_while_upstream_is_down_answers_unavailable_then_recovers() {
    let mut redis = RedisServer::start();
    let mut dir = RestartDir::of(&redis);
    block_in_place(|| redis.kill());
    let proxy = tokio::time::timeout(REPLY_LIMIT, TestProxy::start(&redis))
        .await
        .expect("the proxy starts without its upstream");
    proxy.expect_log(UPSTREAM_CONNECT_FAILED);
    let mut client = Client::connect(proxy.port()).await;
    for _ in 0..5 {
        let started = Instant::now();
        let reply = client.cmd(&["GET", "k"]).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "slow: {reply:?}"
        );
        assert!(
            reply
                .error()
                .is_some_and(|e| e.starts_with("ERR upstream unavailable")),
            "{reply:?}"
        );
    }
    block_in_place(|| dir.restart(&mut redis));
    wait_for_pong(&mut client, Duration::from_secs(10)).await;
    assert_eq!(client.cmd(&["SET", "k", "v"]).await, Reply::status("OK"));
    assert_eq!(client.cmd(&["GET", "k"]).await, Reply::bulk("v"));
    proxy.shutdown().await;
}

/// Sends SIGCONT on drop, so a failed assertion never leaves Redis stopped.
struct Resume<'a>(&'a RedisServer);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.signal("CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_upstream_requests_time_out_in_bounded_time_and_recover_after_sigcont() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.upstream.command_timeout = ConfigDuration(Duration::from_millis(300));
    cfg.upstream.connect_timeout = ConfigDuration(Duration::from_millis(500));
    let proxy = TestProxy::start_with(cfg).await;
    // A timed-out connection is dropped; reconnecting to the hung Redis
    // cannot complete its handshake.
    proxy
        .expect_log(UPSTREAM_LOST)
        .expect_log(UPSTREAM_CONNECT_FAILED);
    let mut client = Client::connect(proxy.port()).await;
    assert_eq!(client.cmd(&["SET", "k", "v"]).await, Reply::status("OK"));

    redis.signal("STOP");
    let resume = Resume(&redis);
    let started = Instant::now();
    // Sent, never answered: its outcome is unknown, so the client's
    // connection closes (upstream.on_lost = "close"), in bounded time.
    client.send(&encode(&["GET", "k"])).await;
    assert!(
        client.closed_within(Duration::from_secs(2)).await,
        "the client of a timed-out request is closed"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "timeout took {:?}",
        started.elapsed()
    );
    // While Redis stays hung, every request fails in bounded time (a timeout,
    // or "unavailable" while reconnecting cannot complete its handshake).
    // (A request sent on a connection not yet found hung closes its client
    // too.)
    let mut client = Client::connect(proxy.port()).await;
    for _ in 0..3 {
        let started = Instant::now();
        client.send(&encode(&["GET", "k"])).await;
        match client.next(Duration::from_secs(2)).await {
            Ok(reply) => assert!(
                reply
                    .error()
                    .is_some_and(|e| e.starts_with("ERR upstream unavailable")),
                "{reply:?}"
            ),
            Err(Ended::Closed) => client = Client::connect(proxy.port()).await,
            Err(Ended::TimedOut) => panic!("no answer within 2 s"),
        }
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    drop(resume);
    wait_for_pong(&mut client, Duration::from_secs(10)).await;
    assert_eq!(client.cmd(&["GET", "k"]).await, Reply::bulk("v"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_upstream_transaction_gets_an_error_in_bounded_time() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    // (The error replies; the default closes the client instead.)
    cfg.upstream.on_lost = nearcache::config::OnLost::Error;
    cfg.upstream.command_timeout = ConfigDuration(Duration::from_millis(300));
    cfg.upstream.connect_timeout = ConfigDuration(Duration::from_millis(500));
    let proxy = TestProxy::start_with(cfg).await;
    let mut client = Client::connect(proxy.port()).await;
    assert_eq!(client.cmd(&["PING"]).await, Reply::status("PONG"));

    redis.signal("STOP");
    let resume = Resume(&redis);
    // MULTI runs on a dedicated connection; a hung Redis must not make it
    // wait forever any more than a shared one does.
    let started = Instant::now();
    client.send(&encode(&["MULTI"])).await;
    let reply = client.next(Duration::from_secs(3)).await;
    assert!(
        matches!(&reply, Ok(Reply::Error(e)) if e.starts_with("ERR upstream")),
        "MULTI on a hung upstream: {reply:?} after {:?}",
        started.elapsed()
    );
    drop(resume);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_during_transaction_answers_exec_with_error_and_recovers() {
    let mut redis = RedisServer::start();
    let mut dir = RestartDir::of(&redis);
    let proxy = TestProxy::start(&redis).await;
    proxy
        .expect_log(UPSTREAM_LOST)
        .expect_log(UPSTREAM_CONNECT_FAILED);
    let mut client = Client::connect(proxy.port()).await;
    assert_eq!(client.cmd(&["MULTI"]).await, Reply::status("OK"));
    assert_eq!(
        client.cmd(&["SET", "tx", "1"]).await,
        Reply::status("QUEUED")
    );
    block_in_place(|| redis.kill());
    let started = Instant::now();
    // Refused if nearcache already saw the connection die; if EXEC went out
    // on it first, its outcome is unknown and the client is closed, as
    // Redis's own connection would be (`upstream.on_lost = "close"`).
    client.send(&encode(&["EXEC"])).await;
    match client.next(REPLY_LIMIT).await {
        Ok(reply) => assert!(
            reply.error().is_some_and(|e| e.starts_with("ERR upstream")),
            "{reply:?}"
        ),
        Err(Ended::Closed) => client = Client::connect(proxy.port()).await,
        Err(e) => panic!("EXEC with Redis gone: {e:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(1));

    block_in_place(|| dir.restart(&mut redis));
    wait_for_pong(&mut client, Duration::from_secs(10)).await;
    // The transaction state went with the connection: a new one works.
    assert_eq!(client.cmd(&["MULTI"]).await, Reply::status("OK"));
    assert_eq!(
        client.cmd(&["SET", "tx", "2"]).await,
        Reply::status("QUEUED")
    );
    assert_eq!(
        client.cmd(&["EXEC"]).await,
        Reply::Array(Some(vec![Reply::status("OK")]))
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_requirepass_works_with_the_url_password_and_start_fails_without_it() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let url = |auth: &str| format!("redis://{auth}127.0.0.1:{}", redis.port());

    let mut cfg = config_for(&redis);
    cfg.upstream.url = url(":s3cret@");
    let proxy = TestProxy::start_with(cfg).await;
    let mut client = Client::connect(proxy.port()).await;
    assert_eq!(client.cmd(&["SET", "k", "v"]).await, Reply::status("OK"));
    assert_eq!(client.cmd(&["GET", "k"]).await, Reply::bulk("v"));
    proxy.shutdown().await;

    for auth in [":wrong-pass@", "default:wrong-pass@", ""] {
        let mut cfg = config_for(&redis);
        cfg.upstream.url = url(auth);
        let err = tokio::time::timeout(REPLY_LIMIT, nearcache::Proxy::start(cfg))
            .await
            .expect("start gives up in time")
            .expect_err("a rejected upstream must fail start")
            .to_string();
        assert!(err.contains("upstream"), "{auth}: {err}");
        assert!(
            err.contains("WRONGPASS") || err.contains("NOAUTH"),
            "{auth}: should say why: {err}"
        );
        assert!(!err.contains("wrong-pass"), "password leaked: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_out_of_range_is_redis_error_and_client_stays_on_its_db() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut client = Client::connect(proxy.port()).await;
    assert_eq!(client.cmd(&["SET", "k", "db0"]).await, Reply::status("OK"));
    assert_eq!(
        client.cmd(&["SELECT", "99"]).await,
        Reply::Error("ERR DB index is out of range".into())
    );
    assert_eq!(client.cmd(&["GET", "k"]).await, Reply::bulk("db0"));

    // Not reset to 0 either: a client on db 1 stays on db 1.
    assert_eq!(client.cmd(&["SELECT", "1"]).await, Reply::status("OK"));
    assert_eq!(client.cmd(&["SET", "k", "db1"]).await, Reply::status("OK"));
    assert_eq!(
        client.cmd(&["SELECT", "99"]).await,
        Reply::Error("ERR DB index is out of range".into())
    );
    assert_eq!(client.cmd(&["GET", "k"]).await, Reply::bulk("db1"));
    proxy.shutdown().await;
}

/// Guards `upstream::breaker` and `Pool::pick`: with Redis gone, commands
/// are refused with one clear error (no doubled prefix); after the
/// configured failed rounds the circuit opens (the refusal says so, and
/// `PROXY STATS` shows it); once Redis is back, the half-open attempt
/// closes it and commands run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_opens_after_failed_rounds_refuses_clearly_and_closes_when_redis_is_back() {
    let mut redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.upstream.breaker_failures = 3;
    cfg.upstream.breaker_cool_down = ConfigDuration(Duration::from_millis(300));
    cfg.upstream.connect_timeout = ConfigDuration(Duration::from_millis(300));
    let proxy = TestProxy::start_with(cfg).await;
    proxy
        .expect_log(UPSTREAM_LOST)
        .expect_log(UPSTREAM_CONNECT_FAILED);
    let mut client = Client::connect(proxy.port()).await;
    let mut admin = proxy.conn().await;
    let circuit_state = "upstream.circuit_state";
    assert_eq!(client.cmd(&["SET", "k", "v"]).await, Reply::status("OK"));
    assert_eq!(proxy_stats(&mut admin).await[circuit_state], 0);
    redis.kill();

    let deadline = Instant::now() + Duration::from_secs(10);
    let refusal = loop {
        client.send(&encode(&["GET", "k"])).await;
        match client.next(Duration::from_secs(5)).await {
            Ok(Reply::Error(e)) if e.contains("(circuit open, next attempt in") => break e,
            Ok(Reply::Error(e)) => assert!(e.starts_with("ERR upstream unavailable: "), "{e}"),
            Err(Ended::Closed) => client = Client::connect(proxy.port()).await,
            other => panic!("GET with Redis gone: {other:?}"),
        }
        assert!(Instant::now() < deadline, "the circuit never opened");
    };
    assert!(
        refusal.starts_with("ERR upstream unavailable: connect to 127.0.0.1:")
            && refusal.matches("upstream unavailable").count() == 1,
        "one clear error: {refusal}"
    );
    assert_eq!(proxy_stats(&mut admin).await[circuit_state], 1, "open");

    redis.restart();
    wait_for_pong(&mut client, Duration::from_secs(10)).await;
    assert_eq!(
        proxy_stats(&mut admin).await[circuit_state],
        0,
        "closed again"
    );
    // (Redis restarted empty.)
    assert_eq!(client.cmd(&["GET", "k"]).await, Reply::Bulk(None));
    proxy.shutdown().await;
}

/// Guards `Session::relay_lost`: a subscriber whose relay connection dies
/// with Redis learns of it, as Redis's own subscribers do (their connection
/// closes at once, and client libraries subscribe again on reconnect).
/// Without it, nearcache left the client connected but no longer subscribed
/// (a PUBLISH after Redis was back reached 0 subscribers), and its next
/// command got no reply at all (found by `scripts/soak.sh`; see
/// `checker::relayed_writers_survive_a_redis_restart` for a `CLIENT
/// TRACKING` client, which lost its tracking the same way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_learns_that_redis_went_away() {
    let mut redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    proxy
        .expect_log(UPSTREAM_LOST)
        .expect_log(UPSTREAM_CONNECT_FAILED);
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port()))
        .await
        .unwrap();
    s.write_all(b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nch\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(b":1\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("SUBSCRIBE answered")
            .unwrap();
        assert!(n > 0, "closed before SUBSCRIBE was answered");
        got.extend_from_slice(&buf[..n]);
    }
    block_in_place(|| redis.kill());
    // Closed, or told with an error: either is what a client can act on.
    let told = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    match told {
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(n)) => assert!(
            buf[..n].starts_with(b"-"),
            "the subscriber got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(_) => panic!(
            "5 s after Redis died the subscriber's connection is still open and silent: \
             it will never hear a PUBLISH again"
        ),
    }
}
