//! Differential test: the same random command stream, pipelined over the same
//! mix of RESP2 and RESP3 connections, goes to one Redis directly and to a
//! second Redis through nearcache with L1 caching every key (positive and
//! negative answers, 60 s) — and every reply must be byte-for-byte the one
//! Redis gave directly.
//!
//! Because L1 holds every read, any write whose keys nearcache misses (a wrong
//! key position, a destination key, another database, a script, a
//! transaction, SWAPDB, a write whose reply `CLIENT REPLY` dropped…) shows
//! up as a stale reply on a later read; and
//! since a pipeline's commands spread over shared, dedicated and other
//! databases' connections, so does any reordering among them. A fourth
//! connection subscribes (and re-subscribes) to channels the stream
//! publishes to; after every batch, the messages it got must match too. The
//! stream is seeded, so a failure names its seed and replays exactly
//! (`NEARCACHE_DIFF_SEED=<seed>` or a range `<from>..<to>`; `NEARCACHE_DIFF_OPS`
//! sets the length).

use std::time::Duration;

use bytes::Bytes;
use nearcache::config::{AuthMode, Duration as Dur, RuleConfig};
use nearcache::server::route::{Route, route};

use crate::compat::{Raw, encode_pipeline, encode_text};
use crate::support::{RedisServer, TestProxy, config_for, free_port};
use nearcache::tls::UpstreamTls;

/// SplitMix64: a tiny deterministic generator, so a seed replays a stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    /// True with probability `pct` percent.
    fn chance(&mut self, pct: usize) -> bool {
        self.below(100) < pct
    }

    fn int(&mut self, lo: i64, hi: i64) -> String {
        (lo + self.below((hi - lo + 1) as usize) as i64).to_string()
    }
}

const STRINGS: &[&str] = &["s0", "s1", "s2", "s3"];
const HASHES: &[&str] = &["h0", "h1", "h2"];
const LISTS: &[&str] = &["l0", "l1", "l2"];
// Set members are integers: Redis 7.0 keeps such sets as intsets, whose
// order is the same on both servers (a hashtable's order depends on a
// per-process seed).
const SETS: &[&str] = &["t0", "t1", "t2"];
const ZSETS: &[&str] = &["z0", "z1", "z2"];
const FIELDS: &[&str] = &["f0", "f1", "f2", "f3"];
const CHANNELS: &[&str] = &["c0", "c1", "c2"];
const VALUES: &[&str] = &["", "a", "bc", "12", "-3", "hello", "7.5", "x\0y"];

/// A key of the family, or now and then of any family (WRONGTYPE replies and
/// type changes through RENAME/COPY are part of the test).
fn key(rng: &mut Rng, family: &[&'static str]) -> String {
    if rng.chance(10) {
        let all = [STRINGS, HASHES, LISTS, SETS, ZSETS];
        let f = all[rng.below(all.len())];
        return rng.pick(f).to_owned();
    }
    rng.pick(family).to_owned()
}

fn value(rng: &mut Rng) -> String {
    rng.pick(VALUES).to_owned()
}

/// One random command (not a transaction or connection-state command).
fn command(rng: &mut Rng) -> Vec<String> {
    let s = |v: &[&str]| v.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    let mut c: Vec<String> = match rng.below(25) {
        // Strings: reads.
        0 => {
            let k = key(rng, STRINGS);
            match rng.below(8) {
                0 => s(&["GET", &k]),
                1 => s(&["STRLEN", &k]),
                2 => s(&["GETRANGE", &k, &rng.int(-3, 2), &rng.int(-2, 4)]),
                3 => s(&["EXISTS", &k]),
                4 => s(&["GETBIT", &k, &rng.int(0, 20)]),
                5 => s(&["BITCOUNT", &k]),
                6 => s(&["BITPOS", &k, &rng.int(0, 1)]),
                _ => {
                    let (a, b) = (key(rng, STRINGS), key(rng, STRINGS));
                    s(&["MGET", &k, &a, &b])
                }
            }
        }
        // Strings: writes.
        1 | 2 => {
            let k = key(rng, STRINGS);
            let v = value(rng);
            match rng.below(16) {
                0 => s(&["SET", &k, &v]),
                1 => s(&["SET", &k, &v, rng.pick(&["NX", "XX", "GET", "KEEPTTL"])]),
                2 => s(&["APPEND", &k, &v]),
                3 => s(&["INCRBY", &k, &rng.int(-5, 5)]),
                4 => s(&["SETRANGE", &k, &rng.int(0, 6), &v]),
                5 => s(&["GETDEL", &k]),
                6 => s(&["GETSET", &k, &v]),
                7 => s(&["SETBIT", &k, &rng.int(0, 20), &rng.int(0, 1)]),
                8 => {
                    let (a, b) = (key(rng, STRINGS), key(rng, STRINGS));
                    s(&["BITOP", rng.pick(&["AND", "OR", "XOR"]), &k, &a, &b])
                }
                9 => {
                    let a = key(rng, STRINGS);
                    s(&["MSET", &k, &v, &a, &value(rng)])
                }
                10 => {
                    let a = key(rng, STRINGS);
                    s(&["MSETNX", &k, &v, &a, &value(rng)])
                }
                11 => s(&["INCRBYFLOAT", &k, "1.5"]),
                12 => s(&["SETEX", &k, "1000", &v]),
                13 => s(&["SUBSTR", &k, "0", "2"]),
                14 => s(&["LCS", &k, &key(rng, STRINGS)]),
                _ => s(&["GETEX", &k, "PERSIST"]),
            }
        }
        // Keys of any type.
        3 | 4 => {
            let fam = [STRINGS, HASHES, LISTS, SETS, ZSETS][rng.below(5)];
            let (a, b) = (key(rng, fam), key(rng, fam));
            // (Copies and moves flush L1, which would hide a missed key if
            // they were frequent: they are rare.)
            match rng.below(40) {
                0..=5 => s(&["DEL", &a]),
                6..=10 => s(&["UNLINK", &a, &b]),
                11..=15 => s(&["RENAME", &a, &b]),
                16..=19 => s(&["RENAMENX", &a, &b]),
                20 => s(&["COPY", &a, &b]),
                21 => s(&["COPY", &a, &b, "REPLACE"]),
                22 => s(&["COPY", &a, &b, "DB", &rng.int(0, 1), "REPLACE"]),
                23 => s(&["MOVE", &a, &rng.int(0, 1)]),
                24..=27 => s(&["EXPIRE", &a, "1000"]),
                28..=30 => s(&["PERSIST", &a]),
                31..=33 => s(&["TYPE", &a]),
                34 | 35 => s(&["EXISTS", &a, &b]),
                36 | 37 => s(&["EXPIRE", &a, "0"]),
                _ => s(&["OBJECT", "ENCODING", &a]),
            }
        }
        // Hashes.
        5..=7 => {
            let k = key(rng, HASHES);
            let (f, g) = (rng.pick(FIELDS), rng.pick(FIELDS));
            match rng.below(13) {
                0 => s(&["HSET", &k, f, &value(rng)]),
                1 => s(&["HSET", &k, f, &value(rng), g, &value(rng)]),
                2 => s(&["HDEL", &k, f]),
                3 => s(&["HINCRBY", &k, f, &rng.int(-3, 3)]),
                4 => s(&["HSETNX", &k, f, &value(rng)]),
                5 => s(&["HGET", &k, f]),
                6 => s(&["HMGET", &k, f, g]),
                7 => s(&["HGETALL", &k]),
                8 => s(&["HLEN", &k]),
                9 => s(&["HEXISTS", &k, f]),
                10 => s(&["HKEYS", &k]),
                11 => s(&["HVALS", &k]),
                _ => s(&["HSTRLEN", &k, f]),
            }
        }
        // Lists.
        8..=10 => {
            let k = key(rng, LISTS);
            match rng.below(15) {
                0 => s(&["LPUSH", &k, &value(rng)]),
                1 => s(&["RPUSH", &k, &value(rng), &value(rng)]),
                2 => s(&["LPOP", &k]),
                3 => s(&["RPOP", &k, &rng.int(1, 2)]),
                4 => s(&["LSET", &k, &rng.int(-2, 2), &value(rng)]),
                5 => s(&["LREM", &k, &rng.int(-1, 1), &value(rng)]),
                6 => s(&["LTRIM", &k, &rng.int(0, 2), &rng.int(-3, 5)]),
                7 => {
                    let d = key(rng, LISTS);
                    let (from, to) = (rng.pick(&["LEFT", "RIGHT"]), rng.pick(&["LEFT", "RIGHT"]));
                    s(&["LMOVE", &k, &d, from, to])
                }
                8 => s(&["LINSERT", &k, "BEFORE", &value(rng), &value(rng)]),
                9 => s(&["LRANGE", &k, "0", "-1"]),
                10 => s(&["LRANGE", &k, &rng.int(-2, 1), &rng.int(-1, 3)]),
                11 => s(&["LLEN", &k]),
                12 => s(&["LINDEX", &k, &rng.int(-2, 2)]),
                13 => s(&["LPOS", &k, &value(rng)]),
                _ => {
                    let d = key(rng, LISTS);
                    s(&["SORT", &k, "ALPHA", "STORE", &d])
                }
            }
        }
        // Sets of integers.
        11..=13 => {
            let k = key(rng, SETS);
            let (m, n) = (rng.int(0, 9), rng.int(0, 9));
            match rng.below(12) {
                0 => s(&["SADD", &k, &m, &n]),
                1 => s(&["SREM", &k, &m]),
                2 => {
                    let d = key(rng, SETS);
                    s(&["SMOVE", &k, &d, &m])
                }
                3 => {
                    let (d, o) = (key(rng, SETS), key(rng, SETS));
                    s(&["SINTERSTORE", &d, &k, &o])
                }
                4 => {
                    let (d, o) = (key(rng, SETS), key(rng, SETS));
                    s(&["SUNIONSTORE", &d, &k, &o])
                }
                5 => s(&["SMEMBERS", &k]),
                6 => s(&["SISMEMBER", &k, &m]),
                7 => s(&["SMISMEMBER", &k, &m, &n]),
                8 => s(&["SCARD", &k]),
                9 => s(&["SORT", &k]),
                10 => {
                    let d = key(rng, LISTS);
                    s(&["SORT", &k, "DESC", "STORE", &d])
                }
                _ => s(&["SADD", &k, &m]),
            }
        }
        // Sorted sets.
        14..=16 => {
            let k = key(rng, ZSETS);
            let m = rng.pick(&["m0", "m1", "m2", "m3"]);
            match rng.below(14) {
                0 => s(&["ZADD", &k, &rng.int(-2, 5), m]),
                1 => s(&["ZINCRBY", &k, &rng.int(-2, 2), m]),
                2 => s(&["ZREM", &k, m]),
                3 => {
                    let (d, o) = (key(rng, ZSETS), key(rng, ZSETS));
                    s(&["ZUNIONSTORE", &d, "2", &k, &o])
                }
                4 => {
                    let d = key(rng, ZSETS);
                    s(&["ZRANGESTORE", &d, &k, "0", "1"])
                }
                5 => s(&["ZPOPMIN", &k]),
                6 => s(&["ZRANGE", &k, "0", "-1", "WITHSCORES"]),
                7 => s(&["ZRANGEBYSCORE", &k, "-inf", &rng.int(-1, 4)]),
                8 => s(&["ZREVRANGE", &k, "0", "2"]),
                9 => s(&["ZSCORE", &k, m]),
                10 => s(&["ZRANK", &k, m]),
                11 => s(&["ZCARD", &k]),
                12 => s(&["ZCOUNT", &k, "0", "3"]),
                _ => s(&["ZMSCORE", &k, m, "m9"]),
            }
        }
        // Scripts and functions: declared keys, undeclared keys, read-only.
        17 => {
            let k = key(rng, STRINGS);
            match rng.below(6) {
                // Redis 7 runs the write in the database the script selects.
                5 => s(&[
                    "EVAL",
                    "redis.call('SELECT', ARGV[2]); return redis.call('SET', KEYS[1], ARGV[1])",
                    "1",
                    &k,
                    &value(rng),
                    &rng.below(2).to_string(),
                ]),
                3 => s(&["FCALL", "setk", "1", &k, &value(rng)]),
                4 => s(&["FCALL_RO", "getk", "1", &k]),
                0 => s(&[
                    "EVAL",
                    "return redis.call('SET', KEYS[1], ARGV[1])",
                    "1",
                    &k,
                    &value(rng),
                ]),
                1 => s(&["EVAL", "return redis.call('DEL', ARGV[1])", "0", &k]),
                _ => s(&["EVAL_RO", "return redis.call('GET', KEYS[1])", "1", &k]),
            }
        }
        // Whole databases, and the rare mistake.
        // (SWAPDB and the flushes empty L1: rare, as above.)
        18 => match rng.below(24) {
            0 => s(&["SWAPDB", "0", "1"]),
            1 => s(&["FLUSHDB"]),
            2 => s(&["DBSIZE"]),
            3 => s(&["NOSUCHCOMMAND", "x"]),
            4 => s(&["GET"]),
            5 => s(&["SET", "s0"]),
            6 => s(&["FLUSHALL"]),
            7 => s(&["EXEC"]),
            8 => s(&["DISCARD"]),
            9 => s(&["CLIENT", "SETNAME", rng.pick(&["n1", "n2"])]),
            10 => s(&["CLIENT", "GETNAME"]),
            11..=17 => s(&["PING"]),
            _ => s(&["ECHO", &value(rng)]),
        },
        // HyperLogLogs live in strings: PFCOUNT may rewrite the cached
        // cardinality inside the value a GET returns.
        19 => {
            let k = key(rng, STRINGS);
            match rng.below(5) {
                0 | 1 => s(&["PFADD", &k, &rng.int(0, 30), &rng.int(0, 30)]),
                2 => s(&["PFCOUNT", &k]),
                3 => {
                    let o = key(rng, STRINGS);
                    s(&["PFMERGE", &k, &o])
                }
                _ => s(&["GET", &k]),
            }
        }
        // Multi-key pops, blocking ones with a timeout short enough to expire.
        20 => {
            let (a, b) = (key(rng, LISTS), key(rng, LISTS));
            let (y, z) = (key(rng, ZSETS), key(rng, ZSETS));
            match rng.below(5) {
                0 => s(&["LMPOP", "2", &a, &b, rng.pick(&["LEFT", "RIGHT"])]),
                1 => s(&["ZMPOP", "2", &y, &z, "MIN", "COUNT", "2"]),
                2 => s(&["BLPOP", &a, &b, "0.01"]),
                3 => s(&["BLMOVE", &a, &b, "LEFT", "RIGHT", "0.01"]),
                _ => s(&["BZPOPMAX", &y, "0.01"]),
            }
        }
        // Messages for the subscriber (see `Side::drain`).
        21 => s(&["PUBLISH", rng.pick(CHANNELS), &value(rng)]),
        // More reads of what is most often cached.
        _ => {
            let fam = [STRINGS, HASHES, LISTS, SETS, ZSETS][rng.below(5)];
            let k = key(rng, fam);
            match fam[0].as_bytes()[0] {
                b's' => s(&["GET", &k]),
                b'h' => s(&["HGETALL", &k]),
                b'l' => s(&["LRANGE", &k, "0", "-1"]),
                b't' => s(&["SMEMBERS", &k]),
                _ => s(&["ZRANGE", &k, "0", "-1", "WITHSCORES"]),
            }
        }
    };
    c.shrink_to_fit();
    c
}

/// Functions for FCALL: one that writes its key, one read-only.
const LIBRARY: &str = "#!lua name=difflib
redis.register_function('setk', function(keys, args) return redis.call('SET', keys[1], args[1]) end)
redis.register_function{function_name='getk', callback=function(keys, args) return redis.call('GET', keys[1]) end, flags={'no-writes'}}";

/// A read of the first key `cmd` names (if any), by the command its family
/// is usually read with.
fn read_back(cmd: &[String]) -> Option<Vec<String>> {
    let all = [STRINGS, HASHES, LISTS, SETS, ZSETS];
    let k = cmd[1..]
        .iter()
        .find(|a| all.iter().any(|f| f.contains(&a.as_str())))?;
    let read: &[&str] = match k.as_bytes()[0] {
        b's' => &["GET"],
        b'h' => &["HGETALL"],
        b'l' => &["LRANGE", "0", "-1"],
        b't' => &["SMEMBERS"],
        _ => &["ZRANGE", "0", "-1", "WITHSCORES"],
    };
    let mut out = vec![read[0].to_owned(), k.clone()];
    out.extend(read[1..].iter().map(|a| (*a).to_owned()));
    Some(out)
}

/// A batch for one connection: one to six commands, now and then wrapped in
/// MULTI/EXEC (or DISCARD), or preceded by a SELECT.
fn batch(rng: &mut Rng) -> Vec<Vec<String>> {
    let select = |rng: &mut Rng| vec!["SELECT".to_owned(), rng.int(0, 1)];
    let mut out = Vec::new();
    if rng.chance(35) {
        // Reads only, as a trading bot mostly sends: these hit L1, so the
        // hit path is checked against Redis too.
        let all = [STRINGS, HASHES, LISTS, SETS, ZSETS];
        for _ in 0..2 + rng.below(6) {
            let family = all[rng.below(all.len())];
            let k = rng.pick(family).to_owned();
            out.extend(read_back(&["GET".to_owned(), k]));
        }
        return out;
    }
    if rng.chance(2) {
        out.push(vec!["RESET".to_owned()]);
    }
    if rng.chance(8) {
        out.push(select(rng));
    }
    if rng.chance(5) {
        out.push(vec!["WATCH".to_owned(), key(rng, STRINGS)]);
    }
    if rng.chance(2) {
        out.push(vec!["UNWATCH".to_owned()]);
    }
    let tx = rng.chance(10);
    if tx {
        out.push(vec!["MULTI".to_owned()]);
    }
    for _ in 0..1 + rng.below(6) {
        if tx && rng.chance(10) {
            // A transaction's writes land in whatever database it selects.
            out.push(select(rng));
        }
        let c = command(rng);
        // Often, read back a key the command named: a write whose keys L1
        // did not drop shows up at once.
        let read = rng.chance(35).then(|| read_back(&c)).flatten();
        out.push(c);
        out.extend(read);
    }
    if tx {
        out.push(vec![
            if rng.chance(85) { "EXEC" } else { "DISCARD" }.to_owned(),
        ]);
    }
    out
}

/// Three connections per side (two RESP2, one RESP3), paired by index.
struct Side {
    conns: Vec<Raw>,
    /// A subscriber (RESP3 when `resp3`), receiving what PUBLISH sends.
    sub: Raw,
}

/// A raw connection, over TLS when `tls` says how, in RESP3 if `resp3`.
async fn open(port: u16, tls: Option<&UpstreamTls>, resp3: bool) -> Raw {
    let mut raw = match tls {
        Some(tls) => Raw::connect_tls(port, tls).await,
        None => Raw::connect(port).await,
    };
    if resp3 {
        raw.resp3 = true;
        let hello = raw.cmd(&["HELLO", "3"]).await;
        assert!(hello.starts_with(b"%"), "HELLO 3: {hello:?}");
    }
    raw
}

impl Side {
    async fn connect(port: u16, resp3: bool, tls: Option<&UpstreamTls>) -> Side {
        Side {
            conns: vec![
                open(port, tls, false).await,
                open(port, tls, false).await,
                open(port, tls, true).await,
            ],
            sub: open(port, tls, resp3).await,
        }
    }

    /// Sends `cmds` and a PING on the subscriber, returns every frame up to
    /// PING's answer: the messages published so far, then the replies.
    async fn drain(&mut self, cmds: &[Vec<String>]) -> Vec<Bytes> {
        let ping = vec!["PING".to_owned()];
        self.sub
            .write(&encode_pipeline(cmds.iter().chain([&ping])))
            .await;
        let mut frames = Vec::new();
        loop {
            let f = self.sub.frame().await;
            // Subscribed RESP2 answers PING with an array; otherwise +PONG.
            let pong = &f[..] == b"*2\r\n$4\r\npong\r\n$0\r\n\r\n" || &f[..] == b"+PONG\r\n";
            frames.push(f);
            if pong {
                return frames;
            }
        }
    }

    /// Sends `cmds` pipelined on connection `i` (those marked in `inline` as
    /// inline commands, the way telnet users type them), returns the replies.
    async fn run(&mut self, i: usize, cmds: &[Vec<String>], inline: &[bool]) -> Vec<Bytes> {
        let mut wire = Vec::new();
        for (c, &inline) in cmds.iter().zip(inline) {
            if inline {
                let line: Vec<String> = c.iter().map(|a| inline_arg(a)).collect();
                wire.extend_from_slice(line.join(" ").as_bytes());
                wire.extend_from_slice(b"\r\n");
            } else {
                wire.extend_from_slice(&encode_text(c));
            }
        }
        // The batch ends with an ECHO of its own, so its replies are known
        // to be complete whatever CLIENT REPLY dropped.
        wire.extend_from_slice(&encode_text(&["ECHO", END]));
        let conn = &mut self.conns[i];
        conn.write(&wire).await;
        let mut replies = Vec::with_capacity(cmds.len());
        loop {
            let f = conn.frame().await;
            if f[..] == *END_REPLY {
                return replies;
            }
            replies.push(f);
        }
    }
}

/// The ECHO that ends every batch, and its reply.
const END: &str = "__end_of_batch__";
const END_REPLY: &[u8] = b"$16\r\n__end_of_batch__\r\n";

/// Now and then has part of a batch's replies dropped: `CLIENT REPLY SKIP`
/// before one command, or `OFF` … `ON` around a few. (Not around a
/// transaction, whose EXEC Redis would answer in part, nor a HELLO, whose
/// reply carries each server's own id.) Whatever is written meanwhile must
/// still reach L1, as later reads show.
fn mute_some(rng: &mut Rng, cmds: &mut Vec<Vec<String>>) {
    let special = |c: &Vec<String>| c[0] == "MULTI" || c[0] == "HELLO";
    if cmds.is_empty() || cmds.iter().any(special) || !rng.chance(8) {
        return;
    }
    let reply = |mode: &str| vec!["CLIENT".to_owned(), "REPLY".to_owned(), mode.to_owned()];
    let at = rng.below(cmds.len());
    if rng.chance(50) {
        cmds.insert(at, reply("SKIP"));
    } else {
        let end = at + 1 + rng.below(cmds.len() - at);
        cmds.insert(end, reply("ON"));
        cmds.insert(at, reply("OFF"));
    }
}

/// An argument as an inline command spells it: bare when it can be, else
/// double-quoted with Redis's escapes (`\"`, `\\`, `\xHH`).
fn inline_arg(arg: &str) -> String {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b":.-+*_".contains(&b);
    if !arg.is_empty() && arg.bytes().all(plain) {
        return arg.to_owned();
    }
    let mut out = String::from("\"");
    for b in arg.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b' '..=b'~' => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push('"');
    out
}

fn cache_everything() -> RuleConfig {
    RuleConfig {
        negative_ttl: Some(Dur(Duration::from_secs(60))),
        ..RuleConfig::caching("", Duration::from_secs(60))
    }
}

/// Replays seed `seed`; with `tls`, nearcache speaks TLS on both sides (its
/// clients to it, it to a Redis that also keeps a plain port for the
/// test's own checks).
async fn replay(seed: u64, ops: usize, tls: bool) {
    // Blocking commands that time out wait for Redis's timer, which runs hz
    // times a second.
    // (And a script answers -BUSY to others 50 ms in.)
    let args = ["--hz", "500", "--busy-reply-threshold", "50"];
    let oracle = RedisServer::start_with(&args);
    let certs = tls.then(crate::tls::Certs::make);
    let tls_port = free_port();
    let behind = match &certs {
        None => RedisServer::start_with(&args),
        Some(certs) => {
            let mut with_tls: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
            with_tls.extend(certs.redis_tls_args(tls_port));
            RedisServer::start_with(&with_tls.iter().map(String::as_str).collect::<Vec<_>>())
        }
    };
    for redis in [&oracle, &behind] {
        add_users(redis);
    }
    let mut cfg = config_for(&behind);
    cfg.cache.rules = vec![cache_everything()];
    // Every third seed lets Redis decide on its own users; every third
    // (from 1) gives up on a silent connection after 100 ms, so requests
    // Redis holds longer (scripts, pauses) must be told from a dead one.
    if seed % 3 == 0 {
        cfg.server.auth = AuthMode::Redis;
    }
    if seed % 3 == 1 {
        cfg.upstream.command_timeout = Dur(Duration::from_millis(100));
    }
    // Odd seeds squeeze the limits, so pipelines stop and resume at their
    // reply budget and every dedicated connection is a fresh one.
    // Every fourth seed (from 2) refreshes hits ahead after 60 ms, so
    // background fetches race the writes all the time.
    if seed % 4 == 2 {
        cfg.cache.rules[0].refresh_ahead = Some(0.001);
    }
    if seed % 2 == 1 {
        cfg.server.max_pending_replies = 3;
        cfg.upstream.max_idle_dedicated = 0;
        cfg.upstream.min_idle_dedicated = 0;
        cfg.upstream.pool_size = 1;
    }
    let client_tls = certs.as_ref().map(|certs| {
        cfg.upstream.url = format!("rediss://127.0.0.1:{tls_port}");
        cfg.upstream.tls.ca_file = Some(certs.crt("ca"));
        cfg.server.tls = Some(crate::tls::server_tls(certs, "server"));
        certs.client()
    });
    let proxy = TestProxy::start_with(cfg).await;
    let sub_resp3 = seed % 2 == 1;
    let mut direct = Side::connect(oracle.port(), sub_resp3, None).await;
    let mut proxied = Side::connect(proxy.port(), sub_resp3, client_tls.as_ref()).await;
    let subscribe = [vec!["SUBSCRIBE".to_owned(), "c0".to_owned()]];
    assert_eq!(
        proxied.drain(&subscribe).await,
        direct.drain(&subscribe).await
    );
    let load = [vec![
        "FUNCTION".to_owned(),
        "LOAD".to_owned(),
        LIBRARY.to_owned(),
    ]];
    let loaded = direct.run(0, &load, &[false]).await;
    assert_eq!(proxied.run(0, &load, &[false]).await, loaded);

    let mut rng = Rng(seed);
    let mut history: Vec<String> = Vec::new();
    let mut sent = 0;
    let mut messages = 0;
    while sent < ops {
        let conn = rng.below(3);
        let mut cmds = batch(&mut rng);
        if conn == 2 {
            // RESET drops a connection back to RESP2; this one stays RESP3.
            if let Some(at) = cmds.iter().position(|c| c[0] == "RESET") {
                cmds.insert(at + 1, vec!["HELLO".to_owned(), "3".to_owned()]);
            }
        }
        mute_some(&mut rng, &mut cmds);
        let inline: Vec<bool> = cmds.iter().map(|_| rng.chance(15)).collect();
        let want = direct.run(conn, &cmds, &inline).await;
        let got = proxied.run(conn, &cmds, &inline).await;
        for c in &cmds {
            history.push(format!("conn {conn}: {}", c.join(" ").escape_debug()));
        }
        if want.len() != cmds.len() || got.len() != cmds.len() {
            // Some replies were dropped: no longer one per command.
            assert_eq!(
                got,
                want,
                "seed {seed}, the batch {cmds:?} (with replies dropped); the last commands:\n{}",
                history[history.len().saturating_sub(60)..].join("\n")
            );
        }
        for (j, c) in cmds.iter().enumerate().take(want.len().min(got.len())) {
            // HELLO reports each server's own client id; its type is what counts.
            let same = if c[0] == "HELLO" {
                got[j].first() == want[j].first()
            } else {
                got[j] == want[j]
            };
            if !same {
                let recent = history.len().saturating_sub(60);
                panic!(
                    "seed {seed}, command {}: `{}` on conn {conn}\n\
                     Redis answered {:?}\nnearcache answered {:?}\n\
                     the whole batch {cmds:?}: Redis {want:?}\nnearcache {got:?}\n\
                     the last commands:\n{}",
                    history.len() - cmds.len() + j + 1,
                    c.join(" ").escape_debug(),
                    want[j],
                    got[j],
                    history[recent..].join("\n"),
                );
            }
        }
        sent += cmds.len();
        // What the subscriber got so far, and now and then a change of what
        // it listens to.
        let mut sub = Vec::new();
        if rng.chance(15) {
            let ch = rng.pick(CHANNELS).to_owned();
            let op = rng.pick(&["SUBSCRIBE", "UNSUBSCRIBE", "PSUBSCRIBE", "PUNSUBSCRIBE"]);
            let arg = if op.starts_with('P') {
                "c*".to_owned()
            } else {
                ch
            };
            sub.push(vec![op.to_owned(), arg]);
        }
        // Replies nearcache makes itself, among Redis's (a RESP3 subscriber
        // may send anything; a RESP2 one is refused them while subscribed,
        // which only Redis's answer to the stand-in tells, and SETNAME while
        // Redis's (un)subscribe replies count a subscription, so it follows
        // a change of subscriptions only once that is answered).
        let mut local = Vec::new();
        if rng.chance(10) {
            let cmd: &[&str] = match rng.below(3) {
                0 => &["CLIENT", "GETNAME"],
                1 => &["GET"],
                _ => &["CLIENT", "SETNAME", "sub"],
            };
            local.push(cmd.iter().map(|a| (*a).to_owned()).collect());
            local.push(vec!["ECHO".to_owned(), "after".to_owned()]);
        }
        if rng.chance(3) {
            // Leaves every channel (the next change may join one again),
            // naming them: without arguments, Redis answers in the order of
            // its own hash table, which differs between two servers.
            let mut all = vec!["UNSUBSCRIBE".to_owned()];
            all.extend(CHANNELS.iter().map(|c| (*c).to_owned()));
            sub.push(all);
            sub.push(vec!["PUNSUBSCRIBE".to_owned(), "c*".to_owned()]);
        }
        let mut want = direct.drain(&sub).await;
        let mut got = proxied.drain(&sub).await;
        if !local.is_empty() {
            want.extend(direct.drain(&local).await);
            got.extend(proxied.drain(&local).await);
        }
        messages += want
            .iter()
            .filter(|f| f.windows(9).any(|w| w == b"message\r\n"))
            .count();
        assert_eq!(
            got,
            want,
            "seed {seed}, subscriber after command {} ({sub:?}); the last commands:\n{}",
            history.len(),
            history[history.len().saturating_sub(20)..].join("\n")
        );
    }
    held_by_redis(
        seed,
        &mut rng,
        [&mut direct, &mut proxied],
        [&oracle, &behind],
    )
    .await;
    // (The stream is long enough that some PUBLISH found the subscriber.)
    assert!(
        messages > 0 || ops < 1000,
        "seed {seed}: no message was delivered"
    );
    proxy.shutdown().await;
}

/// The same ACL users on each Redis: `reader` may read `s*` keys only,
/// `writer` anything.
fn add_users(redis: &RedisServer) {
    let mut c = redis.direct();
    for rule in [
        &[
            "SETUSER",
            "reader",
            "on",
            ">r-pw",
            "~s*",
            "+@read",
            "+@connection",
            "+echo",
        ][..],
        &["SETUSER", "writer", "on", ">w-pw", "~*", "&*", "+@all"],
    ] {
        let _: () = redis::cmd("ACL").arg(rule).query(&mut c).unwrap();
    }
}

/// After the random stream, the same random commands meet what makes Redis
/// hold or refuse them — on each side in turn, and every reply compared:
/// a script running past `busy-reply-threshold` (its caller's answer, others'
/// `-BUSY`), `CLIENT PAUSE WRITE`, and (where Redis decides on users) Redis's
/// ACL users.
async fn held_by_redis(
    seed: u64,
    rng: &mut Rng,
    sides: [&mut Side; 2],
    servers: [&RedisServer; 2],
) {
    let script = vec![
        "EVAL".to_owned(),
        "local t = redis.call('TIME') local stop = t[1] * 1000000 + t[2] + 300000 \
         repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] > stop return 'held'"
            .to_owned(),
        "0".to_owned(),
    ];
    // (Commands nearcache answers itself it answers while Redis is busy too,
    // and a script may wait behind the busy one on its connection where
    // Redis answers -BUSY, both in the README's differences: only other
    // commands going to Redis are compared here.)
    let mut others: Vec<Vec<String>> = Vec::new();
    while others.len() < 3 {
        let c = command(rng);
        let argv: Vec<Bytes> = c.iter().map(|a| Bytes::from(a.clone())).collect();
        if matches!(route(&argv), Route::Forward | Route::Blocking) {
            others.push(c);
        }
    }
    let writes: Vec<Vec<String>> = (0..3).map(|_| command(rng)).collect();
    let as_users: Vec<Vec<String>> = (0..8).map(|_| command(rng)).collect();
    let strs = |cmd: &[&str]| cmd.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    let mut heard: [Vec<Bytes>; 2] = [Vec::new(), Vec::new()];
    for (i, (side, redis)) in sides.into_iter().zip(servers).enumerate() {
        let seen = &mut heard[i];
        // A script on connection 0 past the threshold; the others' commands
        // meanwhile, one at a time, each after Redis is known busy.
        side.conns[0].write(&encode_text(&script)).await;
        let mut probe = Raw::connect(redis.port()).await;
        while !probe.cmd(&["PING"]).await.starts_with(b"-BUSY") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for cmd in &others {
            // (One at a time, without `run`'s ECHO: Redis refuses that too.)
            let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            seen.push(side.conns[1].cmd(&args).await);
        }
        seen.push(side.conns[0].frame().await);
        // Writes held by a pause (past a 100 ms command_timeout), answered
        // once it ends.
        assert_eq!(
            &probe.cmd(&["CLIENT", "PAUSE", "300", "WRITE"]).await[..],
            b"+OK\r\n"
        );
        seen.extend(side.run(2, &writes, &[false; 3]).await);
        // Redis's own users, where Redis decides.
        if seed % 3 == 0 {
            // (From a fresh state: the stream may have left a WATCH, and an
            // AUTH while pinned takes effect when the pin ends.)
            let mut batch = vec![strs(&["RESET"]), strs(&["AUTH", "reader", "r-pw"])];
            batch.extend(as_users[..4].iter().cloned());
            batch.push(strs(&["AUTH", "writer", "w-pw"]));
            batch.extend(as_users[4..].iter().cloned());
            batch.push(strs(&["AUTH", "writer", "wrong"]));
            batch.push(strs(&["RESET"]));
            seen.extend(side.run(1, &batch, &[false; 13]).await);
        }
    }
    assert_eq!(
        heard[1], heard[0],
        "seed {seed}: commands held or refused by Redis (others {others:?}, writes {writes:?}, as users {as_users:?})"
    );
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_commands_through_a_caching_proxy_answer_as_redis_does() {
    let ops = env_or("NEARCACHE_DIFF_OPS", 4000);
    // One seed (`7`), a range (`100..1100`), or the three CI runs.
    let seeds: Vec<u64> = match std::env::var("NEARCACHE_DIFF_SEED") {
        Ok(v) => match v.split_once("..") {
            Some((a, b)) => {
                (a.parse().expect("seed range start")..b.parse().expect("seed range end")).collect()
            }
            None => vec![v.parse().expect("a seed")],
        },
        Err(_) => vec![1, 2, 3],
    };
    for seed in seeds {
        replay(seed, ops, false).await;
    }
}

/// The same with TLS on both sides: nothing TLS does (record boundaries,
/// partial reads, the handshake on every dedicated connection) may change a
/// reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_commands_over_tls_on_both_sides_answer_as_redis_does() {
    nearcache::tls::install_default_provider();
    let ops = env_or("NEARCACHE_DIFF_OPS", 2000);
    for seed in [1, 2] {
        replay(seed, ops, true).await;
    }
}
