//! Compatibility: data commands, protocol switches and connection-local
//! commands behave through the proxy exactly as they do against Redis.
//!
//! Where the exact bytes or RESP3 types matter, the tests speak raw RESP over
//! a socket ([`Raw`]), since a client library would normalise them away; the
//! same helper is used by `stateful.rs` and `cli.rs`.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nearcache::tls::MaybeTls;
use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, Value};
use redis_protocol::resp3::types::OwnedFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{RedisServer, TestProxy, q};

/// How long any single read from a server may take before the test fails.
pub(crate) const IO_LIMIT: Duration = Duration::from_secs(10);

/// A raw RESP connection: writes exactly the bytes given, reads one complete
/// frame at a time (framed with redis-protocol's RESP2 or RESP3 decoder).
pub(crate) struct Raw {
    stream: MaybeTls<TcpStream>,
    buf: BytesMut,
    /// Frame replies as RESP3 (set after `HELLO 3`; RESP2's `$-1` is not RESP3).
    pub(crate) resp3: bool,
}

impl Raw {
    pub(crate) async fn connect(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream: MaybeTls::Plain(stream),
            buf: BytesMut::with_capacity(64 * 1024),
            resp3: false,
        }
    }

    /// [`Raw::connect`] over TLS (`tls` knows the CA to trust).
    pub(crate) async fn connect_tls(port: u16, tls: &nearcache::tls::UpstreamTls) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream: tls.connect(stream).await.unwrap(),
            buf: BytesMut::with_capacity(64 * 1024),
            resp3: false,
        }
    }

    /// Connects and switches to RESP3 (`HELLO 3`, whose reply must be a map).
    pub(crate) async fn connect_resp3(port: u16) -> Raw {
        let mut r = Raw::connect(port).await;
        r.resp3 = true;
        let hello = r.cmd(&["HELLO", "3"]).await;
        assert!(hello.starts_with(b"%"), "HELLO 3: {hello:?}");
        r
    }

    /// This end's `ip:port`: the client's address as the server sees it.
    pub(crate) fn local_addr(&self) -> String {
        self.stream.get_ref().local_addr().unwrap().to_string()
    }

    /// Sends one command whose arguments are text.
    pub(crate) async fn send_str(&mut self, args: &[&str]) {
        self.write(&encode_text(args)).await;
    }

    /// Writes bytes as they are.
    pub(crate) async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends a text command and reads its reply frame.
    pub(crate) async fn cmd(&mut self, args: &[&str]) -> Bytes {
        self.send_str(args).await;
        self.frame().await
    }

    fn complete_len(&self) -> Option<usize> {
        if self.buf.is_empty() {
            return None;
        }
        let decoded = if self.resp3 {
            redis_protocol::resp3::decode::complete::decode(&self.buf).map(|o| o.map(|(_, n)| n))
        } else {
            redis_protocol::resp2::decode::decode(&self.buf).map(|o| o.map(|(_, n)| n))
        };
        match decoded {
            Ok(n) => n,
            Err(e) => panic!(
                "undecodable reply {:?}: {e:?}",
                Bytes::copy_from_slice(&self.buf)
            ),
        }
    }

    /// The next complete frame, raw. Fails the test after [`IO_LIMIT`] or on EOF.
    pub(crate) async fn frame(&mut self) -> Bytes {
        loop {
            if let Some(n) = self.complete_len() {
                return self.buf.split_to(n).freeze();
            }
            let read = tokio::time::timeout(IO_LIMIT, self.stream.read_buf(&mut self.buf))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no complete reply within {IO_LIMIT:?}; have {:?}",
                        Bytes::copy_from_slice(&self.buf)
                    )
                })
                .unwrap();
            assert!(
                read > 0,
                "connection closed; partial reply {:?}",
                Bytes::copy_from_slice(&self.buf)
            );
        }
    }

    /// The next frame decoded as RESP3.
    pub(crate) async fn frame3(&mut self) -> OwnedFrame {
        let raw = self.frame().await;
        redis_protocol::resp3::decode::complete::decode(&raw)
            .unwrap()
            .unwrap()
            .0
    }

    /// Asserts the server closes the connection (after nothing else arrives).
    pub(crate) async fn expect_eof(&mut self) {
        let read = tokio::time::timeout(IO_LIMIT, self.stream.read_buf(&mut self.buf))
            .await
            .expect("connection still open")
            .unwrap_or(0);
        assert_eq!(read, 0, "expected EOF, got {:?}", self.buf);
    }
}

/// RESP array of bulk strings.
pub(crate) fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A command whose arguments are text, as a RESP array of bulk strings.
pub(crate) fn encode_text<S: AsRef<str>>(args: &[S]) -> Vec<u8> {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_ref().as_bytes()).collect();
    encode(&args)
}

/// Commands whose arguments are text, back to back: one pipeline.
pub(crate) fn encode_pipeline<C: AsRef<[S]>, S: AsRef<str>>(
    cmds: impl IntoIterator<Item = C>,
) -> Vec<u8> {
    cmds.into_iter()
        .flat_map(|c| encode_text(c.as_ref()))
        .collect()
}

/// An async connection straight to Redis (bypassing the proxy), in `db`.
pub(crate) async fn direct_async(redis: &RedisServer, db: u32) -> MultiplexedConnection {
    redis::Client::open(format!("{}/{db}", redis.url()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A RESP3 blob string, as a map key.
pub(crate) fn blob(s: &str) -> OwnedFrame {
    OwnedFrame::BlobString {
        data: s.as_bytes().to_vec(),
        attributes: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn string_commands_behave_as_in_redis() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = proxy.conn().await;

    let set: Option<String> = q(&mut c, &["SET", "s", "a", "NX"]).await;
    assert_eq!(set.as_deref(), Some("OK"));
    let set: Option<String> = q(&mut c, &["SET", "s", "b", "NX"]).await;
    assert_eq!(set, None, "NX on an existing key does nothing");
    let set: Option<String> = q(&mut c, &["SET", "missing", "b", "XX"]).await;
    assert_eq!(set, None, "XX on a missing key does nothing");
    let set: Option<String> = q(&mut c, &["SET", "s", "c", "XX", "EX", "100"]).await;
    assert_eq!(set.as_deref(), Some("OK"));
    let ttl: i64 = q(&mut c, &["TTL", "s"]).await;
    assert!((1..=100).contains(&ttl), "EX set a TTL, got {ttl}");
    let old: Option<String> = q(&mut c, &["SET", "s", "d", "GET"]).await;
    assert_eq!(old.as_deref(), Some("c"), "SET … GET returns the old value");
    let ttl: i64 = q(&mut c, &["TTL", "s"]).await;
    assert_eq!(ttl, -1, "a plain SET clears the TTL");
    let exists: i64 = q(&mut c, &["EXISTS", "missing"]).await;
    assert_eq!(exists, 0);

    let n: i64 = q(&mut c, &["INCR", "n"]).await;
    assert_eq!(n, 1);
    let n: i64 = q(&mut c, &["INCRBY", "n", "41"]).await;
    assert_eq!(n, 42);
    let f: String = q(&mut c, &["INCRBYFLOAT", "f", "1.5"]).await;
    assert_eq!(f, "1.5");
    let f: String = q(&mut c, &["INCRBYFLOAT", "f", "0.25"]).await;
    assert_eq!(f, "1.75");
    let err = redis::cmd("INCR")
        .arg("s")
        .query_async::<i64>(&mut c)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not an integer"),
        "INCR on text: {err}"
    );

    let len: i64 = q(&mut c, &["APPEND", "ap", "Hello"]).await;
    assert_eq!(len, 5);
    let len: i64 = q(&mut c, &["APPEND", "ap", " World"]).await;
    assert_eq!(len, 11);
    let sub: String = q(&mut c, &["GETRANGE", "ap", "0", "4"]).await;
    assert_eq!(sub, "Hello");
    let sub: String = q(&mut c, &["GETRANGE", "ap", "-5", "-1"]).await;
    assert_eq!(sub, "World");
    let len: i64 = q(&mut c, &["STRLEN", "ap"]).await;
    assert_eq!(len, 11);

    let _: () = q(&mut c, &["MSET", "m1", "x", "m2", "y", "m3", "z"]).await;
    let got: Vec<Option<String>> = q(&mut c, &["MGET", "m1", "nope", "m3", "m2"]).await;
    assert_eq!(
        got,
        vec![Some("x".into()), None, Some("z".into()), Some("y".into())]
    );

    // And Redis itself holds what the proxy reported.
    let mut d = direct_async(&redis, 0).await;
    let v: Vec<Option<String>> = q(&mut d, &["MGET", "s", "n", "f", "ap", "m2"]).await;
    assert_eq!(
        v,
        vec![
            Some("d".into()),
            Some("42".into()),
            Some("1.75".into()),
            Some("Hello World".into()),
            Some("y".into())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_commands_behave_as_in_redis() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = proxy.conn().await;

    let added: i64 = q(&mut c, &["HSET", "h", "a", "1", "b", "2", "c", "3"]).await;
    assert_eq!(added, 3);
    let added: i64 = q(&mut c, &["HSET", "h", "a", "10"]).await;
    assert_eq!(added, 0, "overwriting a field adds none");
    let a: Option<String> = q(&mut c, &["HGET", "h", "a"]).await;
    assert_eq!(a.as_deref(), Some("10"));
    let none: Option<String> = q(&mut c, &["HGET", "h", "zz"]).await;
    assert_eq!(none, None);
    let b: i64 = q(&mut c, &["HINCRBY", "h", "b", "5"]).await;
    assert_eq!(b, 7);
    let all: Vec<(String, String)> = q(&mut c, &["HGETALL", "h"]).await;
    assert_eq!(
        all,
        vec![
            ("a".into(), "10".into()),
            ("b".into(), "7".into()),
            ("c".into(), "3".into())
        ]
    );
    let vals: Vec<Option<String>> = q(&mut c, &["HMGET", "h", "c", "x", "a"]).await;
    assert_eq!(vals, vec![Some("3".into()), None, Some("10".into())]);
    let del: i64 = q(&mut c, &["HDEL", "h", "a", "x"]).await;
    assert_eq!(del, 1);
    let len: i64 = q(&mut c, &["HLEN", "h"]).await;
    assert_eq!(len, 2);
    let ex: i64 = q(&mut c, &["HEXISTS", "h", "a"]).await;
    assert_eq!(ex, 0);
    let keys: Vec<String> = q(&mut c, &["HKEYS", "h"]).await;
    assert_eq!(keys, vec!["b".to_string(), "c".to_string()]);

    let mut d = direct_async(&redis, 0).await;
    let direct: Vec<(String, String)> = q(&mut d, &["HGETALL", "h"]).await;
    assert_eq!(
        direct,
        vec![("b".into(), "7".into()), ("c".into(), "3".into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_commands_behave_as_in_redis() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = proxy.conn().await;

    let n: i64 = q(&mut c, &["RPUSH", "l", "b", "c", "d"]).await;
    assert_eq!(n, 3);
    let n: i64 = q(&mut c, &["LPUSH", "l", "a"]).await;
    assert_eq!(n, 4);
    let all: Vec<String> = q(&mut c, &["LRANGE", "l", "0", "-1"]).await;
    assert_eq!(all, ["a", "b", "c", "d"]);
    let n: i64 = q(&mut c, &["LINSERT", "l", "BEFORE", "c", "bc"]).await;
    assert_eq!(n, 5);
    let third: String = q(&mut c, &["LINDEX", "l", "2"]).await;
    assert_eq!(third, "bc");
    let first: String = q(&mut c, &["LPOP", "l"]).await;
    assert_eq!(first, "a");
    let last: Vec<String> = q(&mut c, &["RPOP", "l", "2"]).await;
    assert_eq!(last, ["d", "c"]);
    let moved: String = q(&mut c, &["LMOVE", "l", "l2", "LEFT", "RIGHT"]).await;
    assert_eq!(moved, "b");
    let len: i64 = q(&mut c, &["LLEN", "l"]).await;
    assert_eq!(len, 1);
    let popped: Option<String> = q(&mut c, &["LPOP", "nolist"]).await;
    assert_eq!(popped, None);

    let mut d = direct_async(&redis, 0).await;
    let l: Vec<String> = q(&mut d, &["LRANGE", "l", "0", "-1"]).await;
    let l2: Vec<String> = q(&mut d, &["LRANGE", "l2", "0", "-1"]).await;
    assert_eq!((l, l2), (vec!["bc".to_string()], vec!["b".to_string()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_commands_behave_as_in_redis() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = proxy.conn().await;

    let n: i64 = q(&mut c, &["SADD", "s1", "a", "b", "c", "a"]).await;
    assert_eq!(n, 3);
    let _: i64 = q(&mut c, &["SADD", "s2", "b", "c", "d"]).await;
    let is: i64 = q(&mut c, &["SISMEMBER", "s1", "b"]).await;
    assert_eq!(is, 1);
    let is: i64 = q(&mut c, &["SISMEMBER", "s1", "d"]).await;
    assert_eq!(is, 0);
    let card: i64 = q(&mut c, &["SCARD", "s1"]).await;
    assert_eq!(card, 3);
    let members: HashSet<String> = q(&mut c, &["SMEMBERS", "s1"]).await;
    assert_eq!(members, ["a", "b", "c"].map(String::from).into());
    let inter: HashSet<String> = q(&mut c, &["SINTER", "s1", "s2"]).await;
    assert_eq!(inter, ["b", "c"].map(String::from).into());
    let union: HashSet<String> = q(&mut c, &["SUNION", "s1", "s2"]).await;
    assert_eq!(union, ["a", "b", "c", "d"].map(String::from).into());
    let diff: HashSet<String> = q(&mut c, &["SDIFF", "s1", "s2"]).await;
    assert_eq!(diff, ["a"].map(String::from).into());
    let rem: i64 = q(&mut c, &["SREM", "s1", "a", "zz"]).await;
    assert_eq!(rem, 1);

    let mut d = direct_async(&redis, 0).await;
    let direct: HashSet<String> = q(&mut d, &["SMEMBERS", "s1"]).await;
    assert_eq!(direct, ["b", "c"].map(String::from).into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorted_set_commands_behave_as_in_redis() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = proxy.conn().await;

    let n: i64 = q(
        &mut c,
        &[
            "ZADD", "z", "1", "one", "2", "two", "3", "three", "4.5", "four",
        ],
    )
    .await;
    assert_eq!(n, 4);
    let by_score: Vec<String> =
        q(&mut c, &["ZRANGE", "z", "2", "4", "BYSCORE", "WITHSCORES"]).await;
    assert_eq!(by_score, ["two", "2", "three", "3"]);
    let by_score: Vec<String> = q(
        &mut c,
        &["ZRANGE", "z", "(1", "+inf", "BYSCORE", "LIMIT", "0", "2"],
    )
    .await;
    assert_eq!(by_score, ["two", "three"]);
    let score: String = q(&mut c, &["ZINCRBY", "z", "10", "one"]).await;
    assert_eq!(score, "11");
    let all: Vec<String> = q(&mut c, &["ZRANGE", "z", "0", "-1", "WITHSCORES"]).await;
    assert_eq!(all, ["two", "2", "three", "3", "four", "4.5", "one", "11"]);
    let rank: i64 = q(&mut c, &["ZRANK", "z", "four"]).await;
    assert_eq!(rank, 2);
    let s: Option<String> = q(&mut c, &["ZSCORE", "z", "four"]).await;
    assert_eq!(s.as_deref(), Some("4.5"));
    let s: Option<String> = q(&mut c, &["ZSCORE", "z", "nobody"]).await;
    assert_eq!(s, None);
    let rev: Vec<String> = q(&mut c, &["ZRANGE", "z", "+inf", "3", "BYSCORE", "REV"]).await;
    assert_eq!(rev, ["one", "four", "three"]);

    let mut d = direct_async(&redis, 0).await;
    let direct: Vec<String> = q(&mut d, &["ZRANGE", "z", "0", "-1", "WITHSCORES"]).await;
    assert_eq!(direct, all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_commands_behave_as_in_redis() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = proxy.conn().await;

    for (id, v) in [("1-1", "a"), ("2-1", "b"), ("3-1", "c")] {
        let got: String = q(&mut c, &["XADD", "st", id, "f", v]).await;
        assert_eq!(got, id);
    }
    let auto: String = q(&mut c, &["XADD", "st", "*", "f", "d"]).await;
    assert!(auto.contains('-'), "XADD * returns an id, got {auto}");
    let len: i64 = q(&mut c, &["XLEN", "st"]).await;
    assert_eq!(len, 4);
    let range: Vec<(String, Vec<String>)> = q(&mut c, &["XRANGE", "st", "2-0", "3-1"]).await;
    assert_eq!(
        range,
        vec![
            ("2-1".into(), vec!["f".into(), "b".into()]),
            ("3-1".into(), vec!["f".into(), "c".into()])
        ]
    );

    let _: () = q(&mut c, &["XGROUP", "CREATE", "st", "g", "0"]).await;
    type Read = Vec<(String, Vec<(String, Vec<String>)>)>;
    let read: Read = q(
        &mut c,
        &[
            "XREADGROUP",
            "GROUP",
            "g",
            "c1",
            "COUNT",
            "2",
            "STREAMS",
            "st",
            ">",
        ],
    )
    .await;
    assert_eq!(
        read,
        vec![(
            "st".to_string(),
            vec![
                ("1-1".into(), vec!["f".into(), "a".into()]),
                ("2-1".into(), vec!["f".into(), "b".into()])
            ]
        )]
    );
    let acked: i64 = q(&mut c, &["XACK", "st", "g", "1-1", "2-1", "9-9"]).await;
    assert_eq!(
        acked, 2,
        "two delivered entries acknowledged, the unknown one not"
    );
    let acked: i64 = q(&mut c, &["XACK", "st", "g", "1-1"]).await;
    assert_eq!(acked, 0, "already acknowledged");
    let read: Read = q(
        &mut c,
        &[
            "XREADGROUP",
            "GROUP",
            "g",
            "c1",
            "COUNT",
            "1",
            "STREAMS",
            "st",
            ">",
        ],
    )
    .await;
    assert_eq!(
        read[0].1[0].0, "3-1",
        "the group moves on past delivered entries"
    );
    let pending: Vec<Value> = q(&mut c, &["XPENDING", "st", "g"]).await;
    assert_eq!(pending[0], Value::Int(1), "only 3-1 is pending");

    let mut d = direct_async(&redis, 0).await;
    let len: i64 = q(&mut d, &["XLEN", "st"]).await;
    assert_eq!(len, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_commands_behave_and_keys_expire() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = proxy.conn().await;

    let _: () = q(&mut c, &["SET", "e", "v"]).await;
    let pttl: i64 = q(&mut c, &["PTTL", "e"]).await;
    assert_eq!(pttl, -1, "no expiry yet");
    let set: i64 = q(&mut c, &["EXPIRE", "e", "100"]).await;
    assert_eq!(set, 1);
    let pttl: i64 = q(&mut c, &["PTTL", "e"]).await;
    assert!(
        (1..=100_000).contains(&pttl),
        "PTTL after EXPIRE 100: {pttl}"
    );
    let persisted: i64 = q(&mut c, &["PERSIST", "e"]).await;
    assert_eq!(persisted, 1);
    let pttl: i64 = q(&mut c, &["PTTL", "e"]).await;
    assert_eq!(pttl, -1, "PERSIST removed the expiry");
    let pttl: i64 = q(&mut c, &["PTTL", "nokey"]).await;
    assert_eq!(pttl, -2);

    let _: () = q(&mut c, &["SET", "short", "v", "PX", "100"]).await;
    let pttl: i64 = q(&mut c, &["PTTL", "short"]).await;
    assert!((0..=100).contains(&pttl), "PTTL right after PX 100: {pttl}");
    // Poll (bounded) until Redis reports the key gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let exists: i64 = q(&mut c, &["EXISTS", "short"]).await;
        if exists == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "key with PX 100 still exists after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let v: Option<String> = q(&mut c, &["GET", "short"]).await;
    assert_eq!(v, None);
    let v: Option<String> = q(&mut c, &["GET", "e"]).await;
    assert_eq!(v.as_deref(), Some("v"), "the persisted key is still there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_visits_every_key_of_a_1000_key_keyspace() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = proxy.conn().await;

    let expected: HashSet<String> = (0..1000).map(|i| format!("key:{i}")).collect();
    let mut pipe = redis::pipe();
    for k in &expected {
        pipe.cmd("SET").arg(k).arg("v").ignore();
    }
    let _: () = pipe.query_async(&mut c).await.unwrap();

    let mut seen = HashSet::new();
    let mut cursor = "0".to_string();
    let mut rounds = 0;
    loop {
        let (next, keys): (String, Vec<String>) = redis::cmd("SCAN")
            .arg(&cursor)
            .arg("COUNT")
            .arg(50)
            .query_async(&mut c)
            .await
            .unwrap();
        seen.extend(keys);
        cursor = next;
        rounds += 1;
        if cursor == "0" {
            break;
        }
        assert!(rounds < 10_000, "SCAN never returned cursor 0");
    }
    assert!(rounds > 1, "the scan took several round trips");
    let missing: Vec<_> = expected.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "SCAN missed {} keys: {missing:?}",
        missing.len()
    );
    assert_eq!(seen, expected, "SCAN returned keys that were never written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_eval_and_evalsha_see_keys_and_args() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = proxy.conn().await;

    let script = "redis.call('SET', KEYS[1], ARGV[1]) \
                  return {KEYS[1], KEYS[2], ARGV[2], redis.call('GET', KEYS[1])}";
    let got: Vec<String> = q(&mut c, &["EVAL", script, "2", "lk1", "lk2", "val", "extra"]).await;
    assert_eq!(got, ["lk1", "lk2", "extra", "val"]);

    let sha: String = q(&mut c, &["SCRIPT", "LOAD", script]).await;
    assert_eq!(sha.len(), 40);
    let got: Vec<String> = q(&mut c, &["EVALSHA", &sha, "2", "lk3", "lk4", "v3", "x"]).await;
    assert_eq!(got, ["lk3", "lk4", "x", "v3"]);
    let n: i64 = q(
        &mut c,
        &[
            "EVAL",
            "return redis.call('INCRBY', KEYS[1], ARGV[1])",
            "1",
            "ctr",
            "7",
        ],
    )
    .await;
    assert_eq!(n, 7);

    // An unknown script is Redis's own NOSCRIPT error.
    let unknown = ["EVALSHA", "0000000000000000000000000000000000000000", "0"];
    let from_redis = Raw::connect(redis.port()).await.cmd(&unknown).await;
    assert!(from_redis.starts_with(b"-NOSCRIPT"), "{from_redis:?}");
    assert_eq!(
        Raw::connect(proxy.port()).await.cmd(&unknown).await,
        from_redis
    );

    let mut d = direct_async(&redis, 0).await;
    let v: Vec<Option<String>> = q(&mut d, &["MGET", "lk1", "lk3", "ctr"]).await;
    assert_eq!(
        v,
        vec![Some("val".into()), Some("v3".into()), Some("7".into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_writes_land_in_the_selected_database() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = proxy.conn().await;

    let _: () = q(&mut c, &["SELECT", "3"]).await;
    let _: () = q(&mut c, &["SET", "dbkey", "in3"]).await;
    let v: Option<String> = q(&mut c, &["GET", "dbkey"]).await;
    assert_eq!(v.as_deref(), Some("in3"));

    let mut d3 = direct_async(&redis, 3).await;
    let mut d0 = direct_async(&redis, 0).await;
    let v: Option<String> = q(&mut d3, &["GET", "dbkey"]).await;
    assert_eq!(v.as_deref(), Some("in3"), "the write is in db 3");
    let size: i64 = q(&mut d0, &["DBSIZE"]).await;
    assert_eq!(size, 0, "db 0 is untouched");

    let _: () = q(&mut c, &["SELECT", "0"]).await;
    let v: Option<String> = q(&mut c, &["GET", "dbkey"]).await;
    assert_eq!(v, None, "back in db 0 the key is not visible");

    // An out-of-range database is refused with Redis's own words.
    let mut p = Raw::connect(proxy.port()).await;
    let mut d = Raw::connect(redis.port()).await;
    let from_redis = d.cmd(&["SELECT", "99"]).await;
    assert!(from_redis.starts_with(b"-ERR"), "{from_redis:?}");
    assert_eq!(p.cmd(&["SELECT", "99"]).await, from_redis);
    assert_eq!(p.cmd(&["SET", "after", "bad-select"]).await, b"+OK\r\n"[..]);
    let v: Option<String> = q(&mut d0, &["GET", "after"]).await;
    assert_eq!(
        v.as_deref(),
        Some("bad-select"),
        "a refused SELECT leaves the client in db 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_in_different_databases_interleave_without_mixing() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut a = Raw::connect(proxy.port()).await;
    let mut b = Raw::connect(proxy.port()).await;
    assert_eq!(a.cmd(&["SELECT", "1"]).await, b"+OK\r\n"[..]);
    assert_eq!(b.cmd(&["SELECT", "2"]).await, b"+OK\r\n"[..]);
    for i in 0..50 {
        let (va, vb) = (format!("a{i}"), format!("b{i}"));
        assert_eq!(a.cmd(&["SET", "shared", &va]).await, b"+OK\r\n"[..]);
        assert_eq!(b.cmd(&["SET", "shared", &vb]).await, b"+OK\r\n"[..]);
        assert_eq!(
            a.cmd(&["GET", "shared"]).await,
            format!("${}\r\n{va}\r\n", va.len()).as_bytes()[..]
        );
        assert_eq!(
            b.cmd(&["GET", "shared"]).await,
            format!("${}\r\n{vb}\r\n", vb.len()).as_bytes()[..]
        );
        assert_eq!(
            a.cmd(&["INCR", "ctr"]).await,
            format!(":{}\r\n", i + 1).as_bytes()[..]
        );
    }
    let mut d1 = direct_async(&redis, 1).await;
    let mut d2 = direct_async(&redis, 2).await;
    let mut d0 = direct_async(&redis, 0).await;
    let v1: Vec<Option<String>> = q(&mut d1, &["MGET", "shared", "ctr"]).await;
    let v2: Vec<Option<String>> = q(&mut d2, &["MGET", "shared", "ctr"]).await;
    assert_eq!(v1, vec![Some("a49".into()), Some("50".into())]);
    assert_eq!(v2, vec![Some("b49".into()), None]);
    let size0: i64 = q(&mut d0, &["DBSIZE"]).await;
    assert_eq!(size0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10000_command_redis_rs_pipeline_answers_in_order() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = proxy.conn().await;

    let mut pipe = redis::pipe();
    for i in 0..10_000 {
        if i % 2 == 0 {
            pipe.cmd("INCR").arg("ctr");
        } else {
            pipe.cmd("ECHO").arg(format!("m{i}"));
        }
    }
    let replies: Vec<Value> = pipe.query_async(&mut c).await.unwrap();
    assert_eq!(replies.len(), 10_000);
    for (i, r) in replies.iter().enumerate() {
        let want = if i % 2 == 0 {
            Value::Int(i as i64 / 2 + 1)
        } else {
            Value::BulkString(format!("m{i}").into_bytes())
        };
        assert_eq!(r, &want, "reply {i} out of order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10000_command_raw_pipeline_written_at_once_answers_in_order() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;

    let mut request = Vec::new();
    let mut expected = Vec::new();
    for i in 0..10_000u32 {
        match i % 4 {
            0 => {
                request.extend(encode(&[b"INCR", b"ctr"]));
                expected.extend(format!(":{}\r\n", i / 4 + 1).into_bytes());
            }
            1 => {
                let m = format!("msg-{i}");
                request.extend(encode(&[b"ECHO", m.as_bytes()]));
                expected.extend(format!("${}\r\n{m}\r\n", m.len()).into_bytes());
            }
            2 => {
                request.extend(encode(&[b"GET", b"missing"]));
                expected.extend(b"$-1\r\n");
            }
            _ => {
                let k = format!("k{i}");
                request.extend(encode(&[b"SET", k.as_bytes(), b"v"]));
                expected.extend(b"+OK\r\n");
            }
        }
    }

    let stream = TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    let (mut rd, mut wr) = stream.into_split();
    // Write everything in one go from another task: the proxy applies
    // backpressure, so reading must go on at the same time.
    let writer = tokio::spawn(async move {
        wr.write_all(&request).await.unwrap();
        wr
    });
    let mut got = Vec::with_capacity(expected.len());
    let read_all = async {
        while got.len() < expected.len() {
            let n = rd.read_buf(&mut got).await.unwrap();
            assert!(n > 0, "proxy closed after {} reply bytes", got.len());
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read_all)
        .await
        .expect("all 10 000 replies within 60 s");
    let _wr = writer.await.unwrap();
    assert!(
        got == expected,
        "replies differ from the expected sequence (first difference at byte {:?})",
        got.iter().zip(&expected).position(|(a, b)| a != b)
    );
    let mut d = direct_async(&redis, 0).await;
    let ctr: i64 = q(&mut d, &["GET", "ctr"]).await;
    assert_eq!(ctr, 2500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_keys_and_values_round_trip_unchanged() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = proxy.conn().await;
    let mut d = direct_async(&redis, 0).await;

    let every_byte: Vec<u8> = (0..=255u8).collect();
    let one_mib: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let eight_mib: Vec<u8> = (0..8 << 20)
        .map(|i: u32| (i.wrapping_mul(40_503) >> 7) as u8)
        .collect();
    let cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"nul\0key\0".to_vec(), b"nul\0value\0\0".to_vec()),
        (b"crlf\r\nkey".to_vec(), b"$3\r\nfoo\r\n*1\r\n".to_vec()),
        (
            every_byte.clone(),
            every_byte.iter().rev().copied().collect(),
        ),
        (b"one-mib".to_vec(), one_mib),
        (b"eight-mib".to_vec(), eight_mib),
        (b"empty".to_vec(), Vec::new()),
    ];
    for (k, v) in &cases {
        let _: () = c.set(k.as_slice(), v.as_slice()).await.unwrap();
        let through: Vec<u8> = c.get(k.as_slice()).await.unwrap();
        assert!(
            through == *v,
            "value of key {:?} changed through the proxy",
            Bytes::copy_from_slice(&k[..k.len().min(16)])
        );
        let direct: Vec<u8> = d.get(k.as_slice()).await.unwrap();
        assert!(
            direct == *v,
            "Redis holds a different value for key {:?}",
            Bytes::copy_from_slice(&k[..k.len().min(16)])
        );
    }
    let mut keys: Vec<Vec<u8>> = q(&mut c, &["KEYS", "*"]).await;
    keys.sort();
    let mut want: Vec<Vec<u8>> = cases.iter().map(|(k, _)| k.clone()).collect();
    want.sort();
    assert_eq!(keys, want, "binary keys are listed exactly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_3_switches_replies_to_resp3_types() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut setup = proxy.conn().await;
    let _: () = q(&mut setup, &["HSET", "h", "f1", "v1", "f2", "v2"]).await;
    let _: () = q(&mut setup, &["SADD", "s", "a", "b"]).await;
    let _: () = q(&mut setup, &["ZADD", "z", "1.5", "m"]).await;

    let mut r = Raw::connect(proxy.port()).await;
    r.resp3 = true;
    r.send_str(&["HELLO", "3"]).await;
    let hello = r.frame().await;
    assert_eq!(hello[0], b'%', "HELLO 3 reply is a map: {hello:?}");
    let OwnedFrame::Map { data, .. } = redis_protocol::resp3::decode::complete::decode(&hello)
        .unwrap()
        .unwrap()
        .0
    else {
        unreachable!()
    };
    assert_eq!(
        data.get(&blob("proto")),
        Some(&OwnedFrame::Number {
            data: 3,
            attributes: None
        })
    );
    assert_eq!(data.get(&blob("server")), Some(&blob("redis")));

    let map = r.cmd(&["HGETALL", "h"]).await;
    assert_eq!(
        map,
        b"%2\r\n$2\r\nf1\r\n$2\r\nv1\r\n$2\r\nf2\r\n$2\r\nv2\r\n"[..]
    );
    r.send_str(&["SMEMBERS", "s"]).await;
    match r.frame3().await {
        OwnedFrame::Set { data, .. } => {
            assert_eq!(data.len(), 2);
            assert!(data.contains(&blob("a")) && data.contains(&blob("b")));
        }
        other => panic!("SMEMBERS in RESP3 is a set (~), got {other:?}"),
    }
    assert_eq!(r.cmd(&["ZSCORE", "z", "m"]).await, b",1.5\r\n"[..]);
    assert_eq!(r.cmd(&["GET", "missing"]).await, b"_\r\n"[..]);
    assert_eq!(r.cmd(&["EXISTS", "h"]).await, b":1\r\n"[..]);

    // The same commands directly against Redis in RESP3 give the same bytes.
    let mut direct = Raw::connect_resp3(redis.port()).await;
    assert_eq!(direct.cmd(&["HGETALL", "h"]).await, map);
    assert_eq!(direct.cmd(&["ZSCORE", "z", "m"]).await, b",1.5\r\n"[..]);

    // And back to RESP2.
    r.send_str(&["HELLO", "2"]).await;
    r.resp3 = false;
    let hello2 = r.frame().await;
    assert!(
        hello2.starts_with(b"*14\r\n"),
        "HELLO 2 reply is a flat array: {hello2:?}"
    );
    assert!(
        hello2.windows(10).any(|w| w == b"proto\r\n:2\r"),
        "HELLO 2 reports proto 2: {hello2:?}"
    );
    assert_eq!(
        r.cmd(&["HGETALL", "h"]).await,
        b"*4\r\n$2\r\nf1\r\n$2\r\nv1\r\n$2\r\nf2\r\n$2\r\nv2\r\n"[..]
    );
    assert!(r.cmd(&["SMEMBERS", "s"]).await.starts_with(b"*2\r\n"));
    assert_eq!(r.cmd(&["ZSCORE", "z", "m"]).await, b"$3\r\n1.5\r\n"[..]);
    assert_eq!(r.cmd(&["GET", "missing"]).await, b"$-1\r\n"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_setname_getname_and_id_are_per_connection() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut a = Raw::connect(proxy.port()).await;
    let mut b = Raw::connect(proxy.port()).await;

    assert_eq!(a.cmd(&["CLIENT", "GETNAME"]).await, b"$-1\r\n"[..]);
    assert_eq!(a.cmd(&["CLIENT", "SETNAME", "alice"]).await, b"+OK\r\n"[..]);
    assert_eq!(a.cmd(&["CLIENT", "GETNAME"]).await, b"$5\r\nalice\r\n"[..]);
    assert_eq!(
        b.cmd(&["CLIENT", "GETNAME"]).await,
        b"$-1\r\n"[..],
        "names are per connection"
    );

    let mut direct = Raw::connect(redis.port()).await;
    let bad = a.cmd(&["CLIENT", "SETNAME", "has space"]).await;
    assert_eq!(bad, direct.cmd(&["CLIENT", "SETNAME", "has space"]).await);
    assert_eq!(
        a.cmd(&["CLIENT", "GETNAME"]).await,
        b"$5\r\nalice\r\n"[..],
        "a rejected name changes nothing"
    );
    assert_eq!(a.cmd(&["CLIENT", "SETNAME", ""]).await, b"+OK\r\n"[..]);
    assert_eq!(
        a.cmd(&["CLIENT", "GETNAME"]).await,
        b"$-1\r\n"[..],
        "an empty name clears it"
    );

    let id_a = a.cmd(&["CLIENT", "ID"]).await;
    let id_b = b.cmd(&["CLIENT", "ID"]).await;
    assert!(
        id_a.starts_with(b":") && id_b.starts_with(b":"),
        "{id_a:?} {id_b:?}"
    );
    assert_ne!(id_a, id_b, "each client has its own id");
    assert_eq!(a.cmd(&["CLIENT", "ID"]).await, id_a, "the id is stable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_arity_errors_are_worded_as_redis_words_them() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut p = Raw::connect(proxy.port()).await;
    let mut d = Raw::connect(redis.port()).await;
    let cases: &[&[&str]] = &[
        &["GET"],
        &["GET", "a", "b"],
        &["SET", "k"],
        &["HSET", "h", "f"],
        &["LPUSH", "l"],
        &["ZADD", "z", "1"],
        &["EXPIRE", "k"],
        &["XADD", "s"],
        &["CLIENT", "SETNAME"],
        &["CLIENT", "GETNAME", "extra"],
        &["CLIENT", "SETNAME", "a", "b"],
        &["CLIENT", "ID", "extra"],
        &["CONFIG", "GET"],
        &["SELECT"],
        &["PING", "a", "b"],
    ];
    let mut differ = Vec::new();
    for args in cases {
        let from_proxy = p.cmd(args).await;
        let from_redis = d.cmd(args).await;
        assert!(
            from_redis.starts_with(b"-ERR wrong number"),
            "{args:?}: {from_redis:?}"
        );
        if from_proxy != from_redis {
            differ.push(format!(
                "{args:?}: proxy {from_proxy:?}, Redis {from_redis:?}"
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "replies differ from Redis's:\n{}",
        differ.join("\n")
    );
    assert_eq!(
        p.cmd(&["PING"]).await,
        b"+PONG\r\n"[..],
        "the connection is still usable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_command_gets_redis_own_error() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut p = Raw::connect(proxy.port()).await;
    let mut d = Raw::connect(redis.port()).await;
    for args in [
        &["FOOBAR"][..],
        &["FOOBAR", "a", "b c"],
        &["CLIENT", "NOSUCHSUB"],
    ] {
        let from_proxy = p.cmd(args).await;
        let from_redis = d.cmd(args).await;
        assert!(
            from_redis.starts_with(b"-ERR unknown"),
            "{args:?}: {from_redis:?}"
        );
        assert_eq!(from_proxy, from_redis, "{args:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_incrementing_one_key_lose_no_update() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let client = proxy.client();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            let mut last = 0;
            for _ in 0..200 {
                let n: i64 = c.incr("hits", 1).await.unwrap();
                assert!(n > last, "a client sees its own increments in order");
                last = n;
            }
        }));
    }
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("10 000 INCRs within 60 s");
    let mut c = proxy.conn().await;
    let n: i64 = q(&mut c, &["GET", "hits"]).await;
    assert_eq!(n, 10_000);
    let mut d = direct_async(&redis, 0).await;
    let n: i64 = q(&mut d, &["GET", "hits"]).await;
    assert_eq!(n, 10_000);
}

/// `CONFIG|GET` written as one word is an unknown command to Redis (the
/// table names subcommands that way, clients do not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subcommand_name_sent_as_one_word_is_an_unknown_command() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut heard = Vec::new();
    for port in [redis.port(), proxy.port()] {
        let mut c = Raw::connect(port).await;
        heard.push(c.cmd(&["CONFIG|GET", "maxmemory"]).await);
        heard.push(c.cmd(&["client|id"]).await);
    }
    assert!(heard[0].starts_with(b"-ERR unknown command"), "{heard:?}");
    assert_eq!(heard[2..], heard[..2], "through nearcache");
    proxy.shutdown().await;
}
