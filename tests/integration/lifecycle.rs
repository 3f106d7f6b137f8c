//! Lifecycle: how clients and the process begin and end.
//!
//! - Graceful shutdown, with the built binary and real signals: in-flight
//!   requests (a `DEBUG SLEEP`, a `BLPOP` with a timeout) are answered, new
//!   clients are refused, the exit status is 0, and `server.shutdown_timeout`
//!   bounds the wait. In flight is observed, not assumed: Redis reports the
//!   client blocked, or is too busy to answer a direct PING.
//! - Client admission and eviction in-process: `max_clients`, `idle_timeout`
//!   (subscribers exempt) and the proxy's own `password`.
//! - The command line: `check-config`, and the precedence flags > environment
//!   > file, observed by which port answers and which Redis gets the writes.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nearcache::config::Duration as ConfigDuration;

use crate::faults::{Client, REPLY_LIMIT, Reply, accepted_client, decode, encode};
use crate::support::{
    ProxyProcess, RedisServer, TestProxy, config_for, free_port, raw_roundtrip, wait_until,
};

/// What nearcache logs when a shutdown gives up on clients still in flight.
const SHUTDOWN_DEADLINE: &str = "shutdown deadline passed; closing remaining clients";

// ---------------------------------------------------------------------------
// Helpers for the binary.
// ---------------------------------------------------------------------------

/// A blocking RESP connection, for tests that drive the binary from plain
/// `#[test]` functions.
struct SyncClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl SyncClient {
    fn connect(port: u16) -> SyncClient {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        stream.set_read_timeout(Some(REPLY_LIMIT)).unwrap();
        SyncClient {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, args: &[&str]) {
        self.stream.write_all(&encode(args)).unwrap();
    }

    /// The next reply, or `None` if the connection closed first. A reply
    /// slower than [`REPLY_LIMIT`] fails the test.
    fn read(&mut self) -> Option<Reply> {
        loop {
            if let Some((reply, used)) = decode(&self.buf) {
                self.buf.drain(..used);
                return Some(reply);
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if timed_out(&e) => panic!("no reply within {REPLY_LIMIT:?}"),
                Err(_) => return None,
            }
        }
    }

    fn cmd(&mut self, args: &[&str]) -> Reply {
        self.send(args);
        self.read().expect("a reply, not a closed connection")
    }
}

/// A read that hit its socket timeout (the kind differs between platforms).
fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// True when nothing listens on `port` any more (connect is refused).
fn refused(port: u16) -> bool {
    matches!(
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused
    )
}

/// `nearcache` run with exactly `args` and `env` (none of its own variables
/// inherited from the test's environment); killed on drop, its stderr shown
/// if the test fails.
struct Nearcache {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

/// Every variable the binary reads.
const NEARCACHE_ENV: [&str; 6] = [
    "NEARCACHE_LISTEN",
    "NEARCACHE_UPSTREAM",
    "REDIS_URL",
    "NEARCACHE_ADMIN",
    "NATS_URL",
    "NEARCACHE_INSTANCE_ID",
];

impl Nearcache {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Nearcache {
        let dir = tempfile::tempdir().unwrap();
        let stdout = dir.path().join("stdout");
        let stderr = dir.path().join("stderr");
        let mut cmd = Command::new(ProxyProcess::binary());
        for var in NEARCACHE_ENV {
            cmd.env_remove(var);
        }
        let child = cmd
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Nearcache {
            child: Some(child),
            stdout,
            stderr,
            _dir: dir,
        }
    }

    /// Waits for the process to exit, failing the test after `limit`.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let mut status = None;
        wait_until("nearcache to exit", limit, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        self.child = None;
        status.unwrap()
    }

    /// Waits until `port` answers a PING with any reply (PONG, or an upstream
    /// error if the upstream is unreachable), failing if the process exits.
    fn wait_answering(&mut self, port: u16) {
        let child = self.child.as_mut().unwrap();
        let stderr = &self.stderr;
        wait_until(
            &format!("nearcache to answer on port {port}"),
            Duration::from_secs(10),
            || {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!(
                        "nearcache exited ({status}): {}",
                        std::fs::read_to_string(stderr).unwrap_or_default()
                    );
                }
                raw_roundtrip(port, "PING").is_some_and(|r| !r.is_empty())
            },
        );
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Nearcache {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- nearcache stderr ---\n{}", self.stderr());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes `text` to `name` in `dir` and returns its path as a string.
fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// `INFO clients` field `blocked_clients`, straight from Redis.
fn blocked_clients(redis: &RedisServer) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query(&mut redis.direct())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("blocked_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

/// A URL for a port where no Redis runs.
fn dead_upstream() -> String {
    format!("redis://127.0.0.1:{}", free_port())
}

// ---------------------------------------------------------------------------
// Graceful shutdown (the binary).
// ---------------------------------------------------------------------------

/// Waits until Redis is busy executing a command (a direct PING gets no
/// answer within 150 ms): the proof that a `DEBUG SLEEP` sent through the
/// proxy has been forwarded and is in flight.
fn wait_until_redis_busy(redis: &RedisServer) {
    wait_until("Redis to be busy with DEBUG SLEEP", REPLY_LIMIT, || {
        let mut direct = TcpStream::connect((Ipv4Addr::LOCALHOST, redis.port())).unwrap();
        direct
            .set_read_timeout(Some(Duration::from_millis(150)))
            .unwrap();
        direct.write_all(b"PING\r\n").unwrap();
        let mut buf = [0u8; 64];
        direct.read(&mut buf).is_err_and(|e| timed_out(&e))
    });
}

/// A proxy binary with `shutdown_timeout`, in front of a Redis that allows
/// `DEBUG` (Redis 7 refuses it by default).
fn proxy_with_shutdown_timeout(timeout: &str) -> (RedisServer, ProxyProcess, tempfile::TempDir) {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "nearcache.toml",
        &format!("[server]\nshutdown_timeout = \"{timeout}\"\n"),
    );
    let proxy = ProxyProcess::start(&redis, &["--config", &config]);
    (redis, proxy, dir)
}

#[test]
fn sigterm_answers_in_flight_slow_command_refuses_new_clients_and_exits_0() {
    let (redis, mut proxy, _dir) = proxy_with_shutdown_timeout("5s");
    let port = proxy.port();
    let mut client = SyncClient::connect(port);
    assert_eq!(
        client.cmd(&["DEBUG", "SLEEP", "0"]),
        Reply::status("OK"),
        "DEBUG SLEEP works through the proxy"
    );

    client.send(&["DEBUG", "SLEEP", "1"]);
    wait_until_redis_busy(&redis);
    let signalled = Instant::now();
    proxy.signal("TERM");
    wait_until(
        "new connections to be refused after SIGTERM",
        Duration::from_secs(3),
        || refused(port),
    );
    assert_eq!(client.read(), Some(Reply::status("OK")));
    let status = proxy.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}:\n{}", proxy.log());
    assert!(signalled.elapsed() < Duration::from_secs(5));
}

#[test]
fn sigterm_answers_in_flight_blpop_with_a_timeout() {
    let (redis, mut proxy, _dir) = proxy_with_shutdown_timeout("5s");
    let port = proxy.port();
    // In flight: a BLPOP with a 3 s timeout, blocked inside Redis.
    let mut blocked = SyncClient::connect(port);
    blocked.send(&["BLPOP", "shutdown-queue", "3"]);
    wait_until("BLPOP to block in Redis", REPLY_LIMIT, || {
        blocked_clients(&redis) == 1
    });
    proxy.signal("TERM");
    wait_until(
        "new connections to be refused after SIGTERM",
        Duration::from_secs(3),
        || refused(port),
    );
    // The element is pushed after the signal, so its delivery proves the
    // request was still being served.
    let _: i64 = redis::cmd("LPUSH")
        .arg("shutdown-queue")
        .arg("after-sigterm")
        .query(&mut redis.direct())
        .unwrap();
    assert_eq!(
        blocked.read(),
        Some(Reply::Array(Some(vec![
            Reply::bulk("shutdown-queue"),
            Reply::bulk("after-sigterm"),
        ]))),
        "a BLPOP with a timeout is a bounded in-flight request: it must be answered"
    );
    let status = proxy.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}:\n{}", proxy.log());
}

#[test]
fn shutdown_timeout_bounds_the_wait_for_an_in_flight_request() {
    let (redis, mut proxy, _dir) = proxy_with_shutdown_timeout("1s");
    proxy.must_log(SHUTDOWN_DEADLINE);
    let mut client = SyncClient::connect(proxy.port());
    client.send(&["DEBUG", "SLEEP", "5"]);
    wait_until_redis_busy(&redis);
    let signalled = Instant::now();
    proxy.signal("TERM");
    let status = proxy.wait_exit(Duration::from_secs(4));
    assert!(status.success(), "exit status {status}:\n{}", proxy.log());
    assert!(
        signalled.elapsed() >= Duration::from_millis(900),
        "exited after {:?}: did not wait for the in-flight request",
        signalled.elapsed()
    );
    assert_eq!(client.read(), None, "the unanswered client is disconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_shutdown_disconnects_clients_left_after_the_deadline() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.server.shutdown_timeout = ConfigDuration(Duration::from_millis(500));
    let proxy = TestProxy::start_with(cfg).await;
    proxy.must_log(SHUTDOWN_DEADLINE);
    let mut blocked = Client::connect(proxy.port()).await;
    blocked.send(&encode(&["BLPOP", "never", "0"])).await;
    tokio::task::block_in_place(|| {
        wait_until("BLPOP to block in Redis", REPLY_LIMIT, || {
            blocked_clients(&redis) == 1
        })
    });
    tokio::time::timeout(Duration::from_secs(3), proxy.shutdown())
        .await
        .expect("shutdown returns after its deadline");
    // Once shutdown has returned, nothing of the proxy is left serving.
    assert!(
        blocked.closed_within(Duration::from_secs(2)).await,
        "a client outlived Proxy::shutdown"
    );
    tokio::task::block_in_place(|| {
        wait_until(
            "the upstream BLPOP to be abandoned",
            Duration::from_secs(2),
            || blocked_clients(&redis) == 0,
        )
    });
}

#[test]
fn sigint_exits_0() {
    let redis = RedisServer::start();
    let mut proxy = ProxyProcess::start(&redis, &[]);
    let mut client = SyncClient::connect(proxy.port());
    assert_eq!(client.cmd(&["PING"]), Reply::status("PONG"));
    proxy.signal("INT");
    let status = proxy.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}:\n{}", proxy.log());
    assert!(refused(proxy.port()));
    assert_eq!(client.read(), None, "the idle client is disconnected");
}

// ---------------------------------------------------------------------------
// Client admission and eviction (in-process).
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_clients_refuses_the_fourth_client_and_admits_one_after_a_disconnect() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.server.max_clients = 3;
    let proxy = TestProxy::start_with(cfg).await;
    proxy.must_log("max_clients reached; refusing client");
    let port = proxy.port();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(port).await;
        assert_eq!(c.cmd(&["PING"]).await, Reply::status("PONG"));
        clients.push(c);
    }

    // The fourth is told why, unasked, and closed.
    let mut fourth = Client::connect(port).await;
    assert_eq!(
        fourth.read().await,
        Reply::Error("ERR max number of clients reached".into())
    );
    assert!(fourth.closed_within(REPLY_LIMIT).await);
    for c in &mut clients {
        assert_eq!(c.cmd(&["PING"]).await, Reply::status("PONG"));
    }

    // A slot comes free once the proxy notices a disconnect.
    drop(clients.pop());
    clients.push(accepted_client(port).await);
    // And the limit still holds.
    let mut another = Client::connect(port).await;
    assert_eq!(
        another.read().await,
        Reply::Error("ERR max number of clients reached".into())
    );
    for c in &mut clients {
        assert_eq!(c.cmd(&["PING"]).await, Reply::status("PONG"));
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_idle_clients_but_not_active_or_subscribed_ones() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.server.idle_timeout = ConfigDuration(Duration::from_millis(300));
    let proxy = TestProxy::start_with(cfg).await;
    let port = proxy.port();

    let mut subscriber = Client::connect(port).await;
    assert_eq!(
        subscriber.cmd(&["SUBSCRIBE", "news"]).await,
        Reply::Array(Some(vec![
            Reply::bulk("subscribe"),
            Reply::bulk("news"),
            Reply::Int(1)
        ]))
    );
    let mut active = Client::connect(port).await;
    assert_eq!(active.cmd(&["PING"]).await, Reply::status("PONG"));
    let mut idle = Client::connect(port).await;
    assert_eq!(idle.cmd(&["PING"]).await, Reply::status("PONG"));
    let idle_since = Instant::now();

    // Busy for four idle timeouts: a PING every 50 ms.
    let busy = tokio::spawn(async move {
        for _ in 0..24 {
            assert_eq!(active.cmd(&["PING"]).await, Reply::status("PONG"));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(
        idle.closed_within(Duration::from_secs(3)).await,
        "the idle client was not disconnected"
    );
    assert!(
        idle_since.elapsed() >= Duration::from_millis(200),
        "disconnected after {:?}, well before the 300ms idle timeout",
        idle_since.elapsed()
    );
    tokio::time::timeout(Duration::from_secs(10), busy)
        .await
        .expect("active client finishes")
        .expect("the active client was answered throughout");

    // The subscriber has sent nothing for over a second, and still receives.
    assert!(idle_since.elapsed() > Duration::from_secs(1));
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg("news")
        .arg("still here")
        .query(&mut redis.direct())
        .unwrap();
    assert_eq!(receivers, 1, "the subscription was dropped");
    assert_eq!(
        subscriber.read().await,
        Reply::Array(Some(vec![
            Reply::bulk("message"),
            Reply::bulk("news"),
            Reply::bulk("still here")
        ]))
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_spares_a_client_blocked_in_a_command() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.server.idle_timeout = ConfigDuration(Duration::from_millis(300));
    let proxy = TestProxy::start_with(cfg).await;
    let mut client = Client::connect(proxy.port()).await;
    // Blocked for three idle timeouts: waiting on Redis is not idleness
    // (Redis exempts blocked clients from `timeout` too).
    assert_eq!(
        client.cmd(&["BLPOP", "idle-queue", "1"]).await,
        Reply::Array(None)
    );
    assert_eq!(client.cmd(&["PING"]).await, Reply::status("PONG"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_password_requires_auth_and_accepts_auth_forms_and_hello() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.server.password = Some("pw".into());
    let proxy = TestProxy::start_with(cfg).await;
    let port = proxy.port();
    let noauth = Reply::Error("NOAUTH Authentication required.".into());
    let wrongpass = |r: Reply| {
        assert!(
            r.error().is_some_and(|e| e.starts_with("WRONGPASS")),
            "{r:?}"
        );
    };

    // AUTH <password>
    let mut c = Client::connect(port).await;
    assert_eq!(c.cmd(&["PING"]).await, noauth);
    assert_eq!(c.cmd(&["SET", "k", "v"]).await, noauth);
    wrongpass(c.cmd(&["AUTH", "nope"]).await);
    assert_eq!(c.cmd(&["GET", "k"]).await, noauth);
    assert_eq!(c.cmd(&["AUTH", "pw"]).await, Reply::status("OK"));
    assert_eq!(c.cmd(&["SET", "k", "v"]).await, Reply::status("OK"));

    // AUTH default <password>
    let mut c = Client::connect(port).await;
    wrongpass(c.cmd(&["AUTH", "default", "nope"]).await);
    wrongpass(c.cmd(&["AUTH", "someone", "pw"]).await);
    assert_eq!(c.cmd(&["GET", "k"]).await, noauth);
    assert_eq!(c.cmd(&["AUTH", "default", "pw"]).await, Reply::status("OK"));
    assert_eq!(c.cmd(&["GET", "k"]).await, Reply::bulk("v"));

    // HELLO 3 AUTH default <password>
    let mut c = Client::connect(port).await;
    let refused = c.cmd(&["HELLO", "3"]).await;
    assert!(
        refused.error().is_some_and(|e| e.starts_with("NOAUTH")),
        "{refused:?}"
    );
    wrongpass(c.cmd(&["HELLO", "3", "AUTH", "default", "nope"]).await);
    assert_eq!(c.cmd(&["PING"]).await, noauth);
    let Reply::Array(Some(hello)) = c.cmd(&["HELLO", "3", "AUTH", "default", "pw"]).await else {
        panic!("HELLO 3 should answer a map");
    };
    let proto = hello
        .chunks(2)
        .find(|kv| kv[0] == Reply::bulk("proto"))
        .map(|kv| kv[1].clone());
    assert_eq!(proto, Some(Reply::Int(3)));
    assert_eq!(c.cmd(&["GET", "k"]).await, Reply::bulk("v"));
    proxy.shutdown().await;
}

/// Without `server.password`, `AUTH` and `HELLO … AUTH` answer as a Redis
/// whose default user has no password: any password for `default` is
/// accepted (clients configured with credentials keep working), the
/// one-argument form and other users are refused. Redis itself is the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_server_password_auth_answers_as_a_passwordless_redis() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    /// An error's text, or "ok" for a successful reply (HELLO's map differs
    /// in its id between the two).
    fn outcome(r: Reply) -> String {
        r.error().map_or_else(|| "ok".to_string(), str::to_string)
    }
    for cmd in [
        &["AUTH", "secret"][..],
        &["AUTH", "default", "secret"],
        &["AUTH", "someone", "secret"],
        &["AUTH", "a", "b", "c"],
        &["HELLO", "3", "AUTH", "default", "secret"],
        &["HELLO", "2", "AUTH", "someone", "secret"],
    ] {
        let mut direct = Client::connect(redis.port()).await;
        let mut through = Client::connect(proxy.port()).await;
        let want = outcome(direct.cmd(cmd).await);
        assert_eq!(outcome(through.cmd(cmd).await), want, "{cmd:?}");
        // And the connection is usable (or not) alike afterwards.
        assert_eq!(
            outcome(through.cmd(&["PING"]).await),
            outcome(direct.cmd(&["PING"]).await),
            "PING after {cmd:?}"
        );
    }
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------
// The command line.
// ---------------------------------------------------------------------------

#[test]
fn check_config_accepts_the_shipped_config_toml() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let shipped = shipped.to_str().unwrap();
    let mut run = Nearcache::spawn(&["check-config", shipped], &[]);
    let status = run.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}: {}", run.stderr());
    assert!(run.stdout().contains("ok"), "{}", run.stdout());
}

#[test]
fn check_config_rejects_bad_files_naming_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "bad-listen.toml",
            "[server]\nlisten = \"nowhere\"\n",
            "server.listen",
        ),
        (
            "unknown-field.toml",
            "[server]\nlisten_addr = \"127.0.0.1:6380\"\n",
            "listen_addr",
        ),
        (
            "bad-upstream.toml",
            "[upstream]\nurl = \"http://127.0.0.1:6379\"\n",
            "upstream.url",
        ),
        (
            "bad-duration.toml",
            "[upstream]\ncommand_timeout = \"fast\"\n",
            "command_timeout",
        ),
    ];
    for (name, text, field) in cases {
        let path = write_file(dir.path(), name, text);
        let mut run = Nearcache::spawn(&["check-config", &path], &[]);
        let status = run.wait_exit(Duration::from_secs(10));
        let stderr = run.stderr();
        assert!(!status.success(), "{name} passed check-config");
        assert!(stderr.contains(name), "{name}: file not named: {stderr}");
        assert!(
            stderr.contains(field),
            "{name}: {field} not named: {stderr}"
        );
    }
    // A file that does not exist is named too.
    let missing = dir.path().join("missing.toml");
    let mut run = Nearcache::spawn(&["check-config", missing.to_str().unwrap()], &[]);
    assert!(!run.wait_exit(Duration::from_secs(10)).success());
    assert!(run.stderr().contains("missing.toml"), "{}", run.stderr());
}

#[test]
fn protected_mode_refuses_unguarded_listeners_beyond_loopback_and_says_how() {
    let dir = tempfile::tempdir().unwrap();
    // Refused at start, before anything is bound (so nothing listens on
    // other interfaces even for a moment): the message names the field and
    // the ways out.
    let mut run = Nearcache::spawn(
        &[
            "--listen",
            "0.0.0.0:6380",
            "--upstream",
            "redis://127.0.0.1:1",
        ],
        &[],
    );
    assert!(!run.wait_exit(Duration::from_secs(10)).success());
    let stderr = run.stderr();
    for says in [
        "server.listen",
        "protected mode",
        "server.password",
        "server.protected_mode = false",
    ] {
        assert!(stderr.contains(says), "{says} missing: {stderr}");
    }
    let cases = [
        (
            "open.toml",
            "[server]\nlisten = \"0.0.0.0:6380\"\n",
            Some("server.listen"),
        ),
        (
            "open-v6.toml",
            "[server]\nlisten = \"[::]:6380\"\n",
            Some("server.listen"),
        ),
        (
            "open-admin.toml",
            "[admin]\nlisten = \"0.0.0.0:9180\"\n",
            Some("admin.listen"),
        ),
        (
            "guarded.toml",
            "[server]\nlisten = \"0.0.0.0:6380\"\npassword = \"p\"\n[admin]\nlisten = \"0.0.0.0:9180\"\ntoken = \"t\"\n",
            None,
        ),
        (
            "trusted.toml",
            "[server]\nlisten = \"0.0.0.0:6380\"\nprotected_mode = false\n[admin]\nlisten = \"0.0.0.0:9180\"\n",
            None,
        ),
        (
            "loopback.toml",
            "[admin]\nlisten = \"127.0.0.1:9180\"\n",
            None,
        ),
    ];
    for (name, text, refused) in cases {
        let path = write_file(dir.path(), name, text);
        let mut run = Nearcache::spawn(&["check-config", &path], &[]);
        let ok = run.wait_exit(Duration::from_secs(10)).success();
        let stderr = run.stderr();
        match refused {
            Some(field) => {
                assert!(!ok, "{name} passed check-config");
                assert!(
                    stderr.contains(field) && stderr.contains("protected mode"),
                    "{name}: {stderr}"
                );
            }
            None => assert!(ok, "{name} refused: {stderr}"),
        }
    }
}

/// Sets a unique key through the proxy on `port` and reports whether it
/// landed in `redis`.
fn writes_reach(port: u16, redis: &RedisServer) -> bool {
    let key = format!("precedence-{port}");
    let reply = SyncClient::connect(port).cmd(&["SET", &key, "here"]);
    let direct: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query(&mut redis.direct())
        .unwrap();
    reply == Reply::status("OK") && direct.as_deref() == Some("here")
}

#[test]
fn flags_override_the_environment_and_the_file() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (file_port, env_port, flag_port) = (free_port(), free_port(), free_port());
    let config = write_file(
        dir.path(),
        "nearcache.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{file_port}\"\n[upstream]\nurl = \"{}\"\n",
            dead_upstream()
        ),
    );
    let env_listen = format!("127.0.0.1:{env_port}");
    let env_upstream = dead_upstream();
    let flag_listen = format!("127.0.0.1:{flag_port}");
    let mut proxy = Nearcache::spawn(
        &[
            "--config",
            &config,
            "--listen",
            &flag_listen,
            "--upstream",
            &redis.url(),
        ],
        &[
            ("NEARCACHE_LISTEN", &env_listen),
            ("NEARCACHE_UPSTREAM", &env_upstream),
        ],
    );
    proxy.wait_answering(flag_port);
    assert!(refused(env_port), "listening on the environment's address");
    assert!(refused(file_port), "listening on the file's address");
    assert!(writes_reach(flag_port, &redis), "not using --upstream");
}

#[test]
fn environment_overrides_the_file() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (file_port, env_port) = (free_port(), free_port());
    let config = write_file(
        dir.path(),
        "nearcache.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{file_port}\"\n[upstream]\nurl = \"{}\"\n",
            dead_upstream()
        ),
    );
    let env_listen = format!("127.0.0.1:{env_port}");
    let mut proxy = Nearcache::spawn(
        &["--config", &config],
        &[
            ("NEARCACHE_LISTEN", &env_listen),
            ("NEARCACHE_UPSTREAM", &redis.url()),
            // NEARCACHE_UPSTREAM wins over REDIS_URL.
            ("REDIS_URL", &dead_upstream()),
        ],
    );
    proxy.wait_answering(env_port);
    assert!(refused(file_port), "listening on the file's address");
    assert!(
        writes_reach(env_port, &redis),
        "not using NEARCACHE_UPSTREAM"
    );
}

#[test]
fn redis_url_overrides_the_file_upstream() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_file(
        dir.path(),
        "nearcache.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[upstream]\nurl = \"{}\"\n",
            dead_upstream()
        ),
    );
    let mut proxy = Nearcache::spawn(&["--config", &config], &[("REDIS_URL", &redis.url())]);
    proxy.wait_answering(port);
    assert!(writes_reach(port, &redis), "not using REDIS_URL");
}

#[test]
fn invalid_upstream_flag_exits_non_zero_naming_upstream_url() {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut run = Nearcache::spawn(
        &["--listen", &listen, "--upstream", "http://127.0.0.1:6379"],
        &[],
    );
    let status = run.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    assert!(run.stderr().contains("upstream.url"), "{}", run.stderr());
}
