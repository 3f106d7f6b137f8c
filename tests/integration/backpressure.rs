//! Backpressure when Redis stops: 200 clients pipeline a megabyte each at a
//! Redis paused with SIGSTOP. nearcache's memory stays bounded by
//! `upstream.max_in_flight_bytes` (plus what each session holds of its own
//! input), every command is answered — with an error once
//! `command_timeout` has passed — and after SIGCONT everything drains and
//! serves again. The clients are raw sockets, so nothing between them and
//! nearcache buffers or retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::support::{
    ProxyProcess, RedisServer, UPSTREAM_CONNECT_FAILED, UPSTREAM_LOST, wait_until,
};

const CLIENTS: usize = 200;
/// Commands each client pipelines while Redis is stopped.
const PIPELINE: usize = 256;
const VALUE: usize = 4096;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// `upstream.max_in_flight_bytes`.
const CAP_MIB: u64 = 16;
/// The bound this test states for nearcache's RSS growth while Redis is
/// stopped: the cap, plus each session's input buffer (a read of up to
/// 64 KiB) and allocator slack. Without the cap it grows with the whole
/// backlog the clients offer (200 MiB here).
const RSS_GROWTH_BOUND_MIB: u64 = CAP_MIB + 48;
/// How long the whole stopped phase may take, at most.
const LOAD_LIMIT: Duration = Duration::from_secs(60);

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// What one client saw: every reply line, and how long until the last.
struct Seen {
    ok: usize,
    errors: Vec<String>,
    last_after: Duration,
}

/// Pipelines `n` SETs of `VALUE` bytes on a fresh connection and reads
/// every reply (writing and reading at once, as a pipelining client does).
async fn client(port: u16, id: usize, n: usize) -> Seen {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (read, mut write) = stream.into_split();
    let value = "v".repeat(VALUE);
    let mut wire = Vec::with_capacity(n * (VALUE + 64));
    for i in 0..n {
        let key = format!("bp:{id}:{i}");
        wire.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${VALUE}\r\n{value}\r\n",
                key.len()
            )
            .as_bytes(),
        );
    }
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        write.write_all(&wire).await.unwrap();
        write
    });
    let mut lines = BufReader::new(read).lines();
    let mut seen = Seen {
        ok: 0,
        errors: Vec::new(),
        last_after: Duration::ZERO,
    };
    for _ in 0..n {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("a reply per command");
        if line == "+OK" {
            seen.ok += 1;
        } else {
            seen.errors.push(line);
        }
    }
    seen.last_after = start.elapsed();
    drop(writer.await.unwrap());
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_redis_under_200_clients_keeps_memory_bounded_and_everything_answered() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nearcache.toml");
    std::fs::write(
        &config,
        format!(
            "[upstream]\nurl = \"{}\"\ncommand_timeout = \"{}s\"\nconnect_timeout = \"{}s\"\n\
             max_in_flight_bytes = \"{CAP_MIB}MiB\"\n\
             # (every command's error reply is counted; the default closes\n\
             # the client of a command whose outcome is unknown)\n\
             on_lost = \"error\"\n",
            redis.url(),
            COMMAND_TIMEOUT.as_secs(),
            CONNECT_TIMEOUT.as_secs(),
        ),
    )
    .unwrap();
    let proxy = ProxyProcess::start_args(&["--config", config.to_str().unwrap()]);
    proxy
        .expect_log(UPSTREAM_LOST)
        .expect_log(UPSTREAM_CONNECT_FAILED);
    let port = proxy.port();

    // Warm: every session and connection the load uses, once.
    let warm: Vec<_> = (0..CLIENTS)
        .map(|id| tokio::spawn(client(port, id, 1)))
        .collect();
    for w in warm {
        assert_eq!(w.await.unwrap().ok, 1);
    }
    let baseline = rss_kib(proxy.pid());
    assert!(baseline > 0, "RSS is readable");

    redis.signal("STOP");
    let loads: Vec<_> = (0..CLIENTS)
        .map(|id| tokio::spawn(client(port, id, PIPELINE)))
        .collect();
    // Sample RSS until every client has every reply (bounded: the clients
    // are awaited below with the same deadline).
    let pid = proxy.pid();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = std::thread::spawn({
        let done = done.clone();
        let deadline = Instant::now() + LOAD_LIMIT;
        move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        }
    });
    let mut seen = Vec::new();
    for load in loads {
        let s = tokio::time::timeout(LOAD_LIMIT, load).await;
        seen.push(s.expect("every client answered").unwrap());
    }
    done.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap();

    let growth_mib = peak.saturating_sub(baseline) / 1024;
    assert!(
        growth_mib <= RSS_GROWTH_BOUND_MIB,
        "RSS grew {growth_mib} MiB with Redis stopped, from {} MiB (bound {RSS_GROWTH_BOUND_MIB} MiB)",
        baseline / 1024
    );
    // Every command answered, and with Redis stopped, only with errors
    // nearcache documents (nothing can have succeeded).
    let slowest = seen.iter().map(|s| s.last_after).max().unwrap();
    for s in &seen {
        assert_eq!(s.ok, 0, "Redis is stopped");
        assert_eq!(s.errors.len(), PIPELINE);
        for e in &s.errors {
            assert!(
                e.starts_with("-ERR upstream timeout")
                    || e.starts_with("-ERR upstream backlog full")
                    || e.starts_with("-ERR upstream unavailable")
                    || e.starts_with("-ERR upstream connection lost"),
                "{e}"
            );
        }
    }
    // A request waits for room at most command_timeout, one in flight is
    // failed after command_timeout and a probe (connect_timeout); a client's
    // later commands find the pool down and fail at once, or wait for one
    // reconnect attempt.
    let bound = COMMAND_TIMEOUT * 2 + CONNECT_TIMEOUT * 3;
    assert!(
        slowest <= bound,
        "slowest client {slowest:?}, bound {bound:?}"
    );
    let backlog_hit = seen
        .iter()
        .flat_map(|s| &s.errors)
        .any(|e| e.starts_with("-ERR upstream backlog full"));

    redis.signal("CONT");
    wait_until(
        "nearcache to reach Redis again",
        Duration::from_secs(10),
        || crate::support::raw_roundtrip(port, "PING").is_some_and(|r| r == "+PONG"),
    );
    let after: Vec<_> = (0..CLIENTS)
        .map(|id| tokio::spawn(client(port, id, 8)))
        .collect();
    for a in after {
        let s = a.await.unwrap();
        assert_eq!(s.ok, 8, "after SIGCONT: {:?}", s.errors);
    }
    let stats = crate::support::redis_cli(port, &["PROXY", "STATS"], None);
    let field = |name: &str| -> i64 {
        let lines: Vec<&str> = stats.lines().collect();
        let i = lines.iter().position(|l| l.trim() == name).unwrap();
        lines[i + 1].trim().parse().unwrap()
    };
    assert_eq!(field("in_flight"), 0, "drained:\n{stats}");
    assert_eq!(field("in_flight_bytes"), 0, "drained:\n{stats}");
    assert!(
        field("backlog_waits") > 0 && backlog_hit == (field("backlog_refused") > 0),
        "the cap was reached and what it refused was counted:\n{stats}"
    );
}
