//! The real `redis-cli` through the proxy prints what it prints against
//! Redis, and inline commands typed over a raw socket (as telnet sends them)
//! are understood.

#![allow(clippy::unwrap_used)]

use crate::compat::{Raw, direct_async};
use crate::support::{RedisServer, TestProxy, redis_cli};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_set_and_get_through_the_proxy() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let p = proxy.port();

    assert_eq!(
        redis_cli(p, &["SET", "greeting", "hello world"], None),
        "OK\n"
    );
    assert_eq!(redis_cli(p, &["GET", "greeting"], None), "hello world\n");
    assert_eq!(redis_cli(p, &["INCR", "n"], None), "1\n");
    for args in [
        &["GET", "greeting"][..],
        &["GET", "missing"],
        &["INCR", "n"],
        &["TYPE", "greeting"],
    ] {
        let through = redis_cli(p, args, None);
        let direct = redis_cli(redis.port(), args, None);
        // INCR moves on by one between the two runs.
        if args[0] == "INCR" {
            assert_eq!((through.as_str(), direct.as_str()), ("2\n", "3\n"));
        } else {
            assert_eq!(through, direct, "{args:?}");
        }
    }
    let mut d = direct_async(&redis, 0).await;
    let v: String = redis::cmd("GET")
        .arg("greeting")
        .query_async(&mut d)
        .await
        .unwrap();
    assert_eq!(v, "hello world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_pipe_mass_inserts_10000_keys() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;

    let mut input = Vec::new();
    for i in 0..10_000 {
        let (k, v) = (format!("key:{i}"), format!("value:{i}"));
        input.extend(crate::compat::encode(&[b"SET", k.as_bytes(), v.as_bytes()]));
    }
    let out = redis_cli(proxy.port(), &["--pipe"], Some(&input));
    assert!(
        out.contains("errors: 0, replies: 10000"),
        "redis-cli --pipe summary: {out}"
    );

    let mut d = direct_async(&redis, 0).await;
    let size: i64 = redis::cmd("DBSIZE").query_async(&mut d).await.unwrap();
    assert_eq!(size, 10_000);
    let vals: Vec<String> = redis::cmd("MGET")
        .arg("key:0")
        .arg("key:5000")
        .arg("key:9999")
        .query_async(&mut d)
        .await
        .unwrap();
    assert_eq!(vals, ["value:0", "value:5000", "value:9999"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_resp3_hgetall_prints_a_map() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut d = direct_async(&redis, 0).await;
    let _: () = redis::cmd("HSET")
        .arg("h")
        .arg("f1")
        .arg("v1")
        .arg("f2")
        .arg("v2")
        .query_async(&mut d)
        .await
        .unwrap();

    let through = redis_cli(proxy.port(), &["-3", "--no-raw", "HGETALL", "h"], None);
    assert_eq!(
        through, "1# \"f1\" => \"v1\"\n2# \"f2\" => \"v2\"\n",
        "RESP3 map formatting"
    );
    assert_eq!(
        through,
        redis_cli(redis.port(), &["-3", "--no-raw", "HGETALL", "h"], None)
    );
    // RESP2 prints the same reply as a flat array: -3 made the difference.
    let resp2 = redis_cli(proxy.port(), &["--no-raw", "HGETALL", "h"], None);
    assert_eq!(resp2, "1) \"f1\"\n2) \"v1\"\n3) \"f2\"\n4) \"v2\"\n");
    // Raw output in RESP3 matches Redis too.
    assert_eq!(
        redis_cli(proxy.port(), &["-3", "HGETALL", "h"], None),
        redis_cli(redis.port(), &["-3", "HGETALL", "h"], None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_n_selects_the_database() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;

    assert_eq!(
        redis_cli(proxy.port(), &["-n", "2", "SET", "k", "in2"], None),
        "OK\n"
    );
    assert_eq!(
        redis_cli(proxy.port(), &["-n", "2", "GET", "k"], None),
        "in2\n"
    );
    assert_eq!(
        redis_cli(proxy.port(), &["GET", "k"], None),
        "\n",
        "db 0 has no k"
    );

    let mut d2 = direct_async(&redis, 2).await;
    let mut d0 = direct_async(&redis, 0).await;
    let v: Option<String> = redis::cmd("GET")
        .arg("k")
        .query_async(&mut d2)
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("in2"));
    let size: i64 = redis::cmd("DBSIZE").query_async(&mut d0).await.unwrap();
    assert_eq!(size, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_no_raw_escapes_binary_values_as_against_redis() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut d = direct_async(&redis, 0).await;
    let value: &[u8] = b"\x00\x01\xff a\"b\n";
    let _: () = redis::cmd("SET")
        .arg("bin")
        .arg(value)
        .query_async(&mut d)
        .await
        .unwrap();

    let through = redis_cli(proxy.port(), &["--no-raw", "GET", "bin"], None);
    assert_eq!(through, "\"\\x00\\x01\\xff a\\\"b\\n\"\n");
    assert_eq!(
        through,
        redis_cli(redis.port(), &["--no-raw", "GET", "bin"], None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_commands_typed_over_a_raw_socket_work() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut p = Raw::connect(proxy.port()).await;
    let mut d = Raw::connect(redis.port()).await;

    // (typed line, expected reply)
    let session: &[(&[u8], &[u8])] = &[
        (b"SET k \"a b\"\r\n", b"+OK\r\n"),
        (b"GET k\r\n", b"$3\r\na b\r\n"),
        (b"PING\n", b"+PONG\r\n"),
        (b"ECHO 'single quoted'\r\n", b"$13\r\nsingle quoted\r\n"),
        (b"  SET   spaced    out  \r\n", b"+OK\r\n"),
        (b"GET spaced\r\n", b"$3\r\nout\r\n"),
        (b"SET hex \"\\x41\\x42\\t\"\r\n", b"+OK\r\n"),
        (b"GET hex\r\n", b"$3\r\nAB\t\r\n"),
        (b"get K\r\n", b"$-1\r\n"),
        (
            b"NOSUCH a\r\n",
            b"-ERR unknown command 'NOSUCH', with args beginning with: 'a' \r\n",
        ),
    ];
    for (line, want) in session {
        p.write(line).await;
        d.write(line).await;
        let from_proxy = p.frame().await;
        let from_redis = d.frame().await;
        assert_eq!(
            from_redis,
            want[..],
            "Redis's reply to {:?}",
            String::from_utf8_lossy(line)
        );
        assert_eq!(
            from_proxy,
            want[..],
            "proxy's reply to {:?}",
            String::from_utf8_lossy(line)
        );
    }
    // An empty line is ignored: the next reply is PING's.
    p.write(b"\r\n").await;
    p.write(b"PING\r\n").await;
    assert_eq!(p.frame().await, b"+PONG\r\n"[..]);
    // Inline and RESP commands mix on one connection.
    p.send_str(&["GET", "k"]).await;
    assert_eq!(p.frame().await, b"$3\r\na b\r\n"[..]);
}
