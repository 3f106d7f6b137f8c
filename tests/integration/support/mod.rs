//! Test support: real `redis-server` / `nats-server` processes on free
//! loopback ports, and nearcache itself, in-process or as the built binary.
//!
//! Every server is killed on drop. When a test panics, the servers' logs are
//! printed so the failure can be read without re-running.
//!
//! nearcache's own log is checked when its proxy ends ([`log`]): a WARN or
//! ERROR line the test did not declare with `expect_log` (what it provokes:
//! a killed Redis, a stopped NATS) fails the test, with the whole log.

#![allow(dead_code, clippy::unwrap_used, clippy::print_stderr)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nearcache::Config;

pub mod browser;
mod log;
mod query;

pub use log::{
    BUS_LOST, Capture, Expectations, GAP, LogLine, PEER_SILENT, UPSTREAM_CONNECT_FAILED,
    UPSTREAM_LOST,
};
pub use query::{pairs, proxy_stats, q, text};

/// A free loopback port. Bind-and-release: the window before the server binds
/// it is tiny, and a clash shows up as a failed start, which is retried.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("free loopback port")
        .port()
}

/// Polls `ready` every 10 ms until it holds or `limit` passes. For waiting on
/// an external process to reach a state we cannot subscribe to (a server
/// accepting connections); never a stand-in for an event we can await.
pub fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends one inline command over a fresh TCP connection and returns the first
/// reply line (enough to check a server is up).
pub fn raw_roundtrip(port: u16, line: &str) -> Option<String> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("{line}\r\n").as_bytes()).ok()?;
    let mut reader = BufReader::new(s);
    let mut out = String::new();
    reader.read_line(&mut out).ok()?;
    Some(out.trim_end().to_owned())
}

/// Kills `child` (SIGKILL), if it runs, and waits for it to exit.
fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A redis-server on a free loopback port with its own temp dir.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `--option value` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        for _ in 0..5 {
            let mut server = RedisServer {
                child: None,
                port: free_port(),
                dir: tempfile::tempdir().expect("temp dir for redis-server"),
                extra: extra.iter().map(|s| s.to_string()).collect(),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start redis-server after 5 attempts");
    }

    fn spawn(&mut self) -> bool {
        let log = self.dir.path().join("redis.log");
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (install it: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if raw_roundtrip(self.port, "PING")
                .is_some_and(|r| r == "+PONG" || r.starts_with("-NOAUTH"))
            {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false; // port clash or bad option: caller retries
            }
            if Instant::now() > deadline {
                self.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A sync connection straight to this server (bypassing the proxy).
    pub fn direct(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts the server again on the same port (after [`kill`](Self::kill)).
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    /// Starts the server again on the same port with its data files (AOF
    /// directory, RDB) removed first: a restart that lost its disk, so the
    /// new server holds nothing even with `--appendonly yes`.
    pub fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.dir.path().join("appendonlydir"));
        let _ = std::fs::remove_file(self.dir.path().join("dump.rdb"));
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    /// Starts the server again on the same port holding `rdb`'s dataset
    /// instead of nothing (a restore, or a failover to a server with other
    /// data).
    pub fn restart_with_dataset(&mut self, rdb: &Path) {
        self.kill();
        std::fs::copy(rdb, self.dir.path().join("dump.rdb")).expect("copy the dataset");
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    /// `SAVE`s the dataset and returns the file it went to.
    pub fn save(&self) -> PathBuf {
        let _: () = redis::cmd("SAVE").query(&mut self.direct()).unwrap();
        self.dir.path().join("dump.rdb")
    }

    /// Sends SIGSTOP / SIGCONT (a hung server).
    pub fn signal(&self, sig: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(child.id().to_string())
                .status();
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// `CONFIG RESETSTAT`: [`calls`](Self::calls) counts from here.
    pub fn reset_stats(&self) {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut self.direct())
            .unwrap();
    }

    /// Calls of `cmd` so far, from `INFO commandstats` (0 if never called).
    pub fn calls(&self, cmd: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.direct())
            .unwrap();
        let prefix = format!("cmdstat_{}:calls=", cmd.to_lowercase());
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- redis-server log (port {}) ---\n{}",
                self.port,
                self.log()
            );
        }
        self.kill();
    }
}

/// A nats-server on a free loopback port.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl NatsServer {
    /// Starts nats-server and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// The same with extra command-line options (`--user u --pass p`, …).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for nats-server");
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = self.log_path();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(&self.extra)
            .arg("-l")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server (install it: apt-get install nats-server)");
        self.child = Some(child);
        let port = self.port;
        wait_until("nats-server to accept", Duration::from_secs(5), || {
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
        });
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- nats-server log (port {}) ---\n{}",
                self.port,
                self.log()
            );
        }
        self.kill();
    }
}

/// A configuration pointing at `upstream`, listening on a free port.
pub fn config_for(upstream: &RedisServer) -> Config {
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.upstream.url = upstream.url();
    cfg
}

/// nearcache running inside the test process, on a tokio runtime of its own
/// (two workers, like the tests') whose threads all log into this proxy's
/// [`Capture`]: every task the proxy spawns (sessions, upstream connections,
/// pool supervisors, the bus, async-nats's own tasks) runs there. A WARN or
/// ERROR line from nearcache that the test did not declare with
/// [`expect_log`](Self::expect_log) fails the test when the proxy ends.
pub struct TestProxy {
    proxy: Option<nearcache::Proxy>,
    addr: SocketAddr,
    runtime: ProxyRuntime,
    log: Capture,
    expected: Expectations,
}

/// The proxy's runtime, shut down without blocking when dropped: a test drops
/// its proxy inside its own runtime, where blocking is not allowed (and the
/// tasks need not finish: the proxy's connections simply close).
struct ProxyRuntime(Option<tokio::runtime::Runtime>);

impl ProxyRuntime {
    /// A runtime whose every thread logs into `log`.
    fn new(log: &Capture) -> Self {
        let dispatch = log.dispatch();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("nearcache-proxy")
            .on_thread_start(move || {
                // The thread's default for its whole life: it ends with the
                // runtime and takes the dispatcher along.
                std::mem::forget(tracing::dispatcher::set_default(&dispatch));
            })
            .build()
            .expect("a runtime for the proxy");
        ProxyRuntime(Some(runtime))
    }

    /// Runs `task` on this runtime and waits for it from the caller's.
    async fn run<T: Send + 'static>(
        &self,
        task: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let runtime = self.0.as_ref().expect("the runtime is running");
        match runtime.spawn(task).await {
            Ok(out) => out,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl Drop for ProxyRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl TestProxy {
    /// Starts a proxy in front of `upstream` with default settings.
    pub async fn start(upstream: &RedisServer) -> Self {
        Self::start_with(config_for(upstream)).await
    }

    /// Starts a proxy with `cfg` (use [`config_for`] as the base).
    pub async fn start_with(cfg: Config) -> Self {
        let log = Capture::default();
        let runtime = ProxyRuntime::new(&log);
        let proxy = runtime
            .run(nearcache::Proxy::start(cfg))
            .await
            .unwrap_or_else(|e| panic!("proxy starts: {e}\n--- its log ---\n{}", log.text()));
        let addr = proxy.local_addr();
        TestProxy {
            proxy: Some(proxy),
            addr,
            runtime,
            log,
            expected: Expectations::default(),
        }
    }

    /// Declares that lines matching `pattern` may appear in the log (what the
    /// test provokes: a killed Redis, a stopped NATS). A substring, or several
    /// joined by `…` that must appear in that order; declare as narrowly as
    /// the test allows.
    pub fn expect_log(&self, pattern: &str) -> &Self {
        self.expected.may(pattern);
        self
    }

    /// Declares that a line matching `pattern` must appear before the proxy
    /// ends (for a test about that warning).
    pub fn must_log(&self, pattern: &str) -> &Self {
        self.expected.must(pattern);
        self
    }

    /// Waits until a line matching `pattern` is logged (up to `limit`).
    pub async fn wait_for_log(&self, pattern: &str, limit: Duration) {
        self.log.wait_for(pattern, limit).await;
    }

    /// Everything this proxy logged so far (DEBUG and up), one event a line.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The admin listener's address (`admin.listen` set).
    pub fn admin_addr(&self) -> SocketAddr {
        self.proxy
            .as_ref()
            .and_then(|p| p.admin_addr())
            .expect("admin.listen is set")
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// A redis-rs client for the proxy (RESP2).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// A redis-rs client for the proxy speaking RESP3.
    pub fn client_resp3(&self) -> redis::Client {
        redis::Client::open(format!("{}?protocol=resp3", self.url())).unwrap()
    }

    /// An async multiplexed connection to the proxy. With longer timeouts
    /// than redis-rs's defaults (1 s to connect, 500 ms a reply): its
    /// connection setup (`CLIENT SETINFO`) goes to Redis, which a test may
    /// have made unreachable, and nearcache then waits up to the outage's
    /// first `connect_timeout` before it answers.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(10)))
                    .set_response_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .unwrap()
    }

    /// Graceful shutdown (then the log check, as on drop).
    pub async fn shutdown(mut self) {
        if let Some(p) = self.proxy.take() {
            self.runtime.run(p.shutdown()).await;
        }
    }

    /// Stops the proxy at once, as dropping it does, but leaves its log to be
    /// checked when it is dropped: for stopping several proxies together, so
    /// that none lives on to see another fall silent.
    pub fn stop(&mut self) {
        drop(self.proxy.take());
        if let Some(runtime) = self.runtime.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        // Stop the proxy before judging its log, so that what the test does
        // after (killing Redis as it ends) is not the proxy's to report.
        self.stop();
        self.expected.settle(
            &format!("nearcache (in-process, {})", self.addr),
            &self.log.lines(),
            &self.log.text(),
        );
    }
}

/// The built `nearcache` binary, run as a child process, logging at DEBUG to
/// a file. As with [`TestProxy`], a WARN or ERROR line from nearcache that the
/// test did not declare with [`expect_log`](Self::expect_log) fails the test
/// when the process is dropped.
pub struct ProxyProcess {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    expected: Expectations,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Path of the binary Cargo built for this test run.
    pub fn binary() -> &'static Path {
        Path::new(env!("CARGO_BIN_EXE_nearcache"))
    }

    /// Runs `nearcache --listen 127.0.0.1:<free> --upstream <url> <extra…>` and
    /// waits until it answers PING.
    pub fn start(upstream: &RedisServer, extra: &[&str]) -> Self {
        let url = upstream.url();
        Self::start_args(&[&["--upstream", &url], extra].concat())
    }

    /// Runs `nearcache --listen 127.0.0.1:<free> <args…>` (the upstream from
    /// a `--config` file, say) and waits until it answers PING.
    pub fn start_args(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("nearcache.log");
        let port = free_port();
        let child = Command::new(Self::binary())
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(args)
            .env("NEARCACHE_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut p = ProxyProcess {
            child: Some(child),
            port,
            log,
            expected: Expectations::default(),
            _dir: dir,
        };
        wait_until("nearcache to answer PING", Duration::from_secs(10), || {
            if let Some(Ok(Some(status))) = p.child.as_mut().map(|c| c.try_wait()) {
                panic!("nearcache exited at startup ({status}):\n{}", p.log());
            }
            // A proxy with a password answers too.
            raw_roundtrip(port, "PING").is_some_and(|r| r == "+PONG" || r.starts_with("-NOAUTH"))
        });
        p
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends a signal by name (TERM, INT, STOP, CONT).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut status = None;
        let child = self.child.as_mut().expect("running");
        wait_until("nearcache to exit", limit, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        self.child = None;
        status.unwrap()
    }

    /// Declares that lines matching `pattern` may appear in the log, as
    /// [`TestProxy::expect_log`].
    pub fn expect_log(&self, pattern: &str) -> &Self {
        self.expected.may(pattern);
        self
    }

    /// Declares that a line matching `pattern` must appear, as
    /// [`TestProxy::must_log`].
    pub fn must_log(&self, pattern: &str) -> &Self {
        self.expected.must(pattern);
        self
    }

    /// Everything the process logged so far, without colour codes.
    pub fn log_text(&self) -> String {
        log::strip_ansi(&self.log())
    }

    /// Everything the process logged so far (as written: with colour codes).
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        // Killed first, so the whole log is read.
        kill(&mut self.child);
        let text = log::strip_ansi(&self.log());
        let lines: Vec<LogLine> = text.lines().filter_map(log::parse_fmt_line).collect();
        self.expected.settle(
            &format!("nearcache (process, port {})", self.port),
            &lines,
            &text,
        );
    }
}

/// Runs `redis-cli -p PORT <args…>` (stdin optional) and returns its stdout.
/// Bounded: a hung proxy fails the test after 60 s instead of hanging it. The process's exit is polled since it
/// cannot be awaited without tokio's `process` feature.
pub fn redis_cli(port: u16, args: &[&str], stdin: Option<&[u8]>) -> String {
    let mut child = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-cli (install it: apt-get install redis-tools)");
    let input = stdin.map(<[u8]>::to_vec);
    let mut sink = child.stdin.take();
    let feeder = std::thread::spawn(move || {
        if let (Some(sink), Some(input)) = (sink.as_mut(), input) {
            sink.write_all(&input).unwrap();
        }
        // Dropping stdin tells redis-cli the input is over.
    });
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        stdout.read_to_end(&mut out).unwrap();
        out
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("redis-cli {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    feeder.join().unwrap();
    let out = reader.join().unwrap();
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert!(
        status.success(),
        "redis-cli {args:?} failed ({status}): {err}"
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// A TCP relay from a free loopback port to a real server's port, which a
/// test can cut (every connection through it closed, new ones closed on
/// accept) and restore: a network partition between one client and the
/// server, while the server itself stays up for everyone else.
pub struct TcpRelay {
    port: u16,
    cut: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpRelay {
    /// Starts relaying 127.0.0.1:`port` → 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Self {
        Self::start_with(target, None).await
    }

    /// Like [`TcpRelay::start`], with everything the server sends held back
    /// `delay` (in order) before the client gets it: a slow link's replies,
    /// so that a reply is still on its way while other things happen.
    pub async fn start_delayed(target: u16, delay: Duration) -> Self {
        Self::start_with(target, Some(delay)).await
    }

    async fn start_with(target: u16, delay: Option<Duration>) -> Self {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the relay");
        let port = listener.local_addr().expect("relay address").port();
        let cut = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (cut, links) = (cut.clone(), links.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if cut.load(SeqCst) {
                        continue; // dropped: closed at once
                    }
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, target)).await
                    else {
                        continue;
                    };
                    let link = tokio::spawn(async move {
                        match delay {
                            None => {
                                let _ =
                                    tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            }
                            Some(delay) => relay_delayed(client, server, delay).await,
                        }
                    });
                    let abort = link.abort_handle();
                    links.lock().unwrap().push(link);
                    // Cut while connecting: `cut` may have drained the list
                    // before the push.
                    if cut.load(SeqCst) {
                        abort.abort();
                    }
                }
            }
        });
        TcpRelay {
            port,
            cut,
            links,
            accept,
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every connection through the relay and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, SeqCst);
    }
}

/// Client → server as it comes; server → client each chunk `delay` after it
/// was read, in order. Ends when either side closes.
async fn relay_delayed(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let upstream = async {
        let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
    };
    let read = async move {
        let mut buf = vec![0; 64 * 1024];
        while let Ok(n @ 1..) = server_rx.read(&mut buf).await {
            if tx
                .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    };
    let write = async {
        while let Some((at, chunk)) = rx.recv().await {
            // The delay is the point of this relay: the link is slow.
            tokio::time::sleep_until(at).await;
            if client_tx.write_all(&chunk).await.is_err() {
                break;
            }
        }
    };
    // (The writer drains what was read before the server closed.)
    tokio::select! {
        () = upstream => {}
        ((), ()) = async { tokio::join!(read, write) } => {}
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Certificates for TLS tests, made with the `openssl` command (P-256).
pub struct TlsFiles {
    /// A throwaway CA.
    pub ca: PathBuf,
    /// A server certificate for 127.0.0.1 that the CA signed, and its key.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate (CN nearcache) that the CA signed, and its key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Makes a CA and a server and a client certificate it signed, in `dir`.
pub fn tls_certificates(dir: &Path) -> TlsFiles {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl (install it: apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &[
            "req",
            "-x509",
            "-days",
            "1",
            "-subj",
            "/CN=nearcache test CA",
        ][..],
        &ec,
        &["-keyout", "ca.key", "-out", "ca.pem"],
    ]
    .concat());
    // `name`.pem and `name`.key for `subject`, signed by the CA, with the
    // X.509 extensions in `ext`.
    let signed = |name: &str, subject: &str, ext: &str| {
        let (key, csr, pem, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        run(&[
            &["req", "-subj", subject][..],
            &ec,
            &["-keyout", &key, "-out", &csr],
        ]
        .concat());
        std::fs::write(dir.join(&extfile), ext).expect("write the extensions file");
        run(&[
            "x509",
            "-req",
            "-days",
            "1",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            &extfile,
            "-out",
            &pem,
        ]);
        (dir.join(pem), dir.join(key))
    };
    let (server_cert, server_key) =
        signed("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\n");
    let (client_cert, client_key) =
        signed("client", "/CN=nearcache", "extendedKeyUsage=clientAuth\n");
    TlsFiles {
        ca: dir.join("ca.pem"),
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}

/// `SET key value`, then `reads` GETs of it (each must return `value`): the
/// write and the miss-then-hits most cache tests start from.
pub async fn set_then_get(
    c: &mut redis::aio::MultiplexedConnection,
    key: &str,
    value: &str,
    reads: usize,
) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async(c)
        .await
        .unwrap();
    for _ in 0..reads {
        let got: String = redis::cmd("GET").arg(key).query_async(c).await.unwrap();
        assert_eq!(got, value, "GET {key}");
    }
}

/// One HTTP/1.1 GET to `addr` (Connection: close) with extra header lines
/// (each ending in `\r\n`): (status, body).
pub fn http_get(addr: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: nearcache\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    (status, body.to_owned())
}
