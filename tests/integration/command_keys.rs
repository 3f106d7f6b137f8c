//! The command table and key extraction, checked against a real redis-server:
//! `key_positions` must agree with `COMMAND GETKEYS` / `GETKEYSANDFLAGS`, and
//! the generated table must list exactly the server's commands (so a table
//! generated from an older Redis fails here instead of misrouting requests).
//!
//! Self-contained: starts its own redis-server rather than depending on the
//! shared `support` module.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nearcache::command::keys::key_positions;
use nearcache::command::{CommandSpec, all, key_flag, resolve};

/// A private redis-server on a free loopback port, killed on drop.
struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        // Bind-and-release picks a free port; the window before redis-server
        // binds it is tiny and a clash shows up as a failed start below.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("free loopback port")
            .port();
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (is it installed?)");
        let mut server = Server {
            child,
            port,
            _dir: dir,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if ping(self.port) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("redis-server exited during startup: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "redis-server not answering PING on port {} after 5 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn connection(&self) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .and_then(|c| c.get_connection())
            .expect("connect to redis-server")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"*1\r\n$4\r\nPING\r\n").is_ok()
        && s.read_exact(&mut buf).is_ok()
        && &buf == b"+PONG\r\n"
}

/// Splits on spaces; `""` stands for an empty argument.
fn argv(line: &str) -> Vec<Vec<u8>> {
    line.split(' ')
        .map(|a| {
            if a == "\"\"" {
                Vec::new()
            } else {
                a.as_bytes().to_vec()
            }
        })
        .collect()
}

fn ours(args: &[Vec<u8>]) -> (Vec<(Vec<u8>, u16)>, bool) {
    let spec: &CommandSpec = resolve(args).expect("command is in the table");
    let mut out = Vec::new();
    let complete = key_positions(spec, args, &mut out).is_complete();
    let keys = out
        .into_iter()
        .map(|(pos, flags)| (args[pos].clone(), flags))
        .collect();
    (keys, complete)
}

fn getkeys(con: &mut redis::Connection, args: &[Vec<u8>]) -> redis::RedisResult<Vec<Vec<u8>>> {
    redis::cmd("COMMAND").arg("GETKEYS").arg(args).query(con)
}

fn getkeysandflags(
    con: &mut redis::Connection,
    args: &[Vec<u8>],
) -> redis::RedisResult<Vec<(Vec<u8>, Vec<String>)>> {
    redis::cmd("COMMAND")
        .arg("GETKEYSANDFLAGS")
        .arg(args)
        .query(con)
}

fn flag_names(flags: u16) -> BTreeSet<String> {
    const NAMES: &[(u16, &str)] = &[
        (key_flag::RO, "RO"),
        (key_flag::RW, "RW"),
        (key_flag::OW, "OW"),
        (key_flag::RM, "RM"),
        (key_flag::ACCESS, "access"),
        (key_flag::UPDATE, "update"),
        (key_flag::INSERT, "insert"),
        (key_flag::DELETE, "delete"),
        (key_flag::NOT_KEY, "not_key"),
        (key_flag::INCOMPLETE, "incomplete"),
        (key_flag::VARIABLE_FLAGS, "variable_flags"),
    ];
    NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect()
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

fn show(keys: &[Vec<u8>]) -> Vec<String> {
    keys.iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}

/// Well-formed requests. Key names are unique within a request, so comparing
/// key names compares positions.
const CORPUS: &[&str] = &[
    "GET k1",
    "SET k1 v",
    "SET k1 v EX 10 GET",
    "SETNX k1 v",
    "GETSET k1 v",
    "GETDEL k1",
    "GETEX k1 EX 10",
    "MSET k1 v1 k2 v2 k3 v3",
    "MSETNX k1 v1 k2 v2",
    "MGET k1 k2 k3",
    "DEL k1 k2",
    "UNLINK k1 k2 k3",
    "EXISTS k1 k2",
    "TOUCH k1",
    "TYPE k1",
    "EXPIRE k1 10",
    "DUMP k1",
    "RESTORE k1 0 payload REPLACE",
    "RENAME k1 k2",
    "RENAMENX k1 k2",
    "COPY k1 k2 REPLACE",
    "INCR k1",
    "APPEND k1 v",
    "GETRANGE k1 0 1",
    "LCS k1 k2",
    "LPUSH k1 a b",
    "LRANGE k1 0 -1",
    "LMOVE k1 k2 LEFT RIGHT",
    "BLMOVE k1 k2 LEFT RIGHT 0",
    "RPOPLPUSH k1 k2",
    "BRPOPLPUSH k1 k2 0",
    "BLPOP k1 k2 0",
    "BRPOP k1 k2 k3 1",
    "LMPOP 2 k1 k2 LEFT COUNT 2",
    "BLMPOP 0 2 k1 k2 RIGHT",
    "SADD k1 a",
    "SMISMEMBER k1 a b",
    "SMOVE k1 k2 m",
    "SINTER k1 k2",
    "SDIFF k1 k2 k3",
    "SINTERSTORE d k1 k2",
    "SUNIONSTORE d k1 k2",
    "SINTERCARD 2 k1 k2 LIMIT 5",
    "ZADD k1 1 a",
    "ZUNIONSTORE d 2 k1 k2 WEIGHTS 1 2",
    "ZINTERSTORE d 2 k1 k2",
    "ZDIFFSTORE d 2 k1 k2",
    "ZUNION 2 k1 k2 WITHSCORES",
    "ZINTER 3 k1 k2 k3",
    "ZDIFF 2 k1 k2",
    "ZINTERCARD 2 k1 k2 LIMIT 1",
    "ZRANGESTORE d k1 0 -1",
    "ZMPOP 2 k1 k2 MIN",
    "BZMPOP 0 2 k1 k2 MAX COUNT 3",
    "BZPOPMIN k1 k2 0",
    "HSET k1 f v",
    "HGETALL k1",
    "PFADD k1 a",
    "PFCOUNT k1 k2",
    "PFMERGE d k1 k2",
    "BITOP AND d k1 k2",
    "BITCOUNT k1",
    "BITFIELD k1 GET u8 0",
    "BITFIELD k1 OVERFLOW SAT INCRBY u8 0 1",
    "BITFIELD_RO k1 GET u8 0",
    "EVAL s 2 k1 k2 a1 a2",
    "EVAL s 0 a1",
    "EVAL_RO s 1 k1 a1",
    "EVALSHA 0123 1 k1 a1",
    "FCALL f 2 k1 k2 a1",
    "FCALL_RO f 1 k1",
    "XADD k1 * f v",
    "XRANGE k1 - +",
    "XREAD COUNT 1 STREAMS k1 k2 0 0",
    "XREAD BLOCK 0 STREAMS k1 $",
    "XREADGROUP GROUP g c COUNT 1 STREAMS k1 k2 > >",
    "XREADGROUP GROUP g c NOACK STREAMS k1 0",
    "XINFO STREAM k1",
    "XGROUP CREATE k1 g $",
    "SORT k1",
    "SORT k1 LIMIT 0 5 ALPHA STORE d",
    "SORT k1 BY nosort GET # STORE d",
    "SORT_RO k1 ALPHA DESC",
    "GEOADD k1 0 0 m",
    "GEORADIUS k1 0 0 10 km",
    "GEORADIUS k1 0 0 10 km STORE d",
    "GEORADIUS k1 0 0 10 km COUNT 3 STOREDIST d",
    "GEORADIUSBYMEMBER k1 m 10 km STORE d",
    "GEOSEARCHSTORE d k1 FROMMEMBER m BYRADIUS 10 km",
    "OBJECT ENCODING k1",
    "OBJECT FREQ k1",
    "MEMORY USAGE k1",
    "MIGRATE h 6379 k1 0 5000",
    "MIGRATE h 6379 k1 0 5000 COPY REPLACE",
    "MIGRATE h 6379 \"\" 0 5000 KEYS k1 k2",
    "MIGRATE h 6379 \"\" 0 5000 COPY REPLACE AUTH pw KEYS k1 k2 k3",
    "MIGRATE h 6379 \"\" 0 5000 AUTH2 u pw KEYS k1",
    "WATCH k1 k2",
];

#[test]
fn key_positions_match_command_getkeys_for_corpus() {
    let server = Server::start();
    let mut con = server.connection();
    let mut failures = Vec::new();
    for line in CORPUS {
        let args = argv(line);
        let theirs =
            getkeys(&mut con, &args).unwrap_or_else(|e| panic!("COMMAND GETKEYS {line}: {e}"));
        let (keys, complete) = ours(&args);
        let mine: Vec<Vec<u8>> = keys.into_iter().map(|(k, _)| k).collect();
        if !complete || sorted(mine.clone()) != sorted(theirs.clone()) {
            failures.push(format!(
                "{line}: ours {:?} (complete: {complete}), server {:?}",
                show(&mine),
                show(&theirs)
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn key_flags_match_command_getkeysandflags_for_corpus() {
    let server = Server::start();
    let mut con = server.connection();
    let mut failures = Vec::new();
    for line in CORPUS {
        let args = argv(line);
        let theirs = getkeysandflags(&mut con, &args)
            .unwrap_or_else(|e| panic!("COMMAND GETKEYSANDFLAGS {line}: {e}"));
        // Redis's generic getkeys helpers (used when a spec cannot be
        // resolved) report no flags at all; there is nothing to compare then.
        if theirs.iter().any(|(_, f)| f.is_empty()) {
            continue;
        }
        let theirs: Vec<_> = theirs
            .into_iter()
            .map(|(k, f)| (k, f.into_iter().collect::<BTreeSet<_>>()))
            .collect();
        let mine: Vec<_> = ours(&args)
            .0
            .into_iter()
            .map(|(k, f)| (k, flag_names(f)))
            .collect();
        if sorted(mine.clone()) != sorted(theirs.clone()) {
            failures.push(format!("{line}: ours {mine:?}, server {theirs:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn keyless_and_malformed_requests_yield_no_keys() {
    // GETKEYS either errors ("no key arguments", "Invalid arguments") or
    // answers with an empty list for these.
    const NO_KEYS: &[&str] = &[
        "PING x",
        "ECHO x",
        "INFO server",
        "PUBLISH ch msg",
        "SPUBLISH ch msg",
        "SSUBSCRIBE ch1 ch2",
        "CLIENT SETNAME x",
        "CONFIG GET maxmemory",
        "ZUNION 0 k1",
        "LMPOP 3 k1 LEFT",
        "SINTERCARD x k1",
        "EVAL s 5 k1",
        "EVAL s -1 k1",
        "XREAD STREAMS k1",
        "MIGRATE h 6379 k1 0 5000 KEYS k2",
    ];
    let server = Server::start();
    let mut con = server.connection();
    for line in NO_KEYS {
        let args = argv(line);
        if let Ok(theirs) = getkeys(&mut con, &args) {
            assert!(
                theirs.is_empty(),
                "{line}: server found {:?}",
                show(&theirs)
            );
        }
        let (mine, _) = ours(&args);
        assert!(mine.is_empty(), "{line}: ours found {mine:?}");
    }
}

#[test]
fn sort_with_key_patterns_is_reported_incomplete() {
    // SORT's BY/GET patterns read keys named after the data; GETKEYS only
    // names the fixed ones, and so do we, but we must say there is more.
    let server = Server::start();
    let mut con = server.connection();
    for line in ["SORT k1 BY w_* STORE d", "SORT_RO k1 GET o_*->f"] {
        let args = argv(line);
        let theirs = getkeys(&mut con, &args).expect("GETKEYS");
        let (keys, complete) = ours(&args);
        let mine: Vec<Vec<u8>> = keys.into_iter().map(|(k, _)| k).collect();
        assert_eq!(sorted(mine), sorted(theirs), "{line}");
        assert!(!complete, "{line} must be incomplete");
    }
}

#[test]
fn pfmerge_without_sources_reports_the_destination_getkeys_omits() {
    // Redis's key specs call an empty source range invalid, so GETKEYS
    // rejects `PFMERGE d`, yet the command runs and creates d. Invalidation
    // must follow what the command does.
    let server = Server::start();
    let mut con = server.connection();
    let args = argv("PFMERGE d");
    let (keys, complete) = ours(&args);
    assert_eq!(
        keys,
        [(
            b"d".to_vec(),
            key_flag::RW | key_flag::ACCESS | key_flag::INSERT
        )]
    );
    assert!(complete);
    let _: () = redis::cmd("PFMERGE")
        .arg("d")
        .query(&mut con)
        .expect("PFMERGE d");
    let exists: i64 = redis::cmd("EXISTS")
        .arg("d")
        .query(&mut con)
        .expect("EXISTS");
    assert_eq!(exists, 1, "PFMERGE d creates d");
}

#[test]
fn sort_store_key_is_the_one_sort_writes() {
    // Redis's sortGetKeys does not skip STORE's argument, so for
    // `STORE by STORE x` GETKEYS names `by` while SORT writes `x`.
    let server = Server::start();
    let mut con = server.connection();
    let _: i64 = redis::cmd("RPUSH")
        .arg(&["k", "3", "1", "2"])
        .query(&mut con)
        .expect("RPUSH");
    let args = argv("SORT k STORE by STORE x");
    let (keys, complete) = ours(&args);
    let mine: Vec<Vec<u8>> = keys.into_iter().map(|(k, _)| k).collect();
    assert_eq!(mine, [b"k".to_vec(), b"x".to_vec()]);
    assert!(complete);
    let _: i64 = redis::cmd("SORT")
        .arg(&args[1..])
        .query(&mut con)
        .expect("SORT");
    let exists: (i64, i64) = redis::pipe()
        .cmd("EXISTS")
        .arg("x")
        .cmd("EXISTS")
        .arg("by")
        .query(&mut con)
        .expect("EXISTS");
    assert_eq!(exists, (1, 0), "SORT stored into x, not by");
}

fn table_names() -> BTreeSet<String> {
    all()
        .iter()
        .chain(all().iter().flat_map(|c| c.subcommands))
        .map(|c| c.name.to_owned())
        .collect()
}

#[test]
fn command_table_lists_exactly_the_servers_commands() {
    let server = Server::start();
    let mut con = server.connection();
    let listed: Vec<String> = redis::cmd("COMMAND")
        .arg("LIST")
        .query(&mut con)
        .expect("COMMAND LIST");
    // Redis 7.0 lists subcommands as `container|sub`; accept either style.
    let server_top: BTreeSet<String> = listed
        .iter()
        .filter(|n| !n.contains('|'))
        .map(|n| n.to_ascii_lowercase())
        .collect();
    let table_top: BTreeSet<String> = all().iter().map(|c| c.name.to_owned()).collect();
    assert_eq!(
        table_top.difference(&server_top).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "in the table but not on the server: regenerate with scripts/gen-command-table.py"
    );
    assert_eq!(
        server_top.difference(&table_top).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "on the server but not in the table: regenerate with scripts/gen-command-table.py"
    );
    let server_subs: BTreeSet<String> = listed
        .iter()
        .filter(|n| n.contains('|'))
        .map(|n| n.to_ascii_lowercase())
        .collect();
    if !server_subs.is_empty() {
        let table_subs: BTreeSet<String> = table_names()
            .into_iter()
            .filter(|n| n.contains('|'))
            .collect();
        assert_eq!(
            table_subs, server_subs,
            "subcommands differ from the server's"
        );
    }
}

#[test]
fn command_table_arity_and_key_spec_counts_match_server() {
    let server = Server::start();
    let mut con = server.connection();
    let mut failures = Vec::new();
    for name in table_names() {
        let spec = nearcache::command::lookup(name.as_bytes()).expect("table name resolves");
        let (container, sub) = match name.split_once('|') {
            Some((c, s)) => (c.to_owned(), Some(s.to_owned())),
            None => (name.clone(), None),
        };
        let info: Vec<redis::Value> = redis::cmd("COMMAND")
            .arg("INFO")
            .arg(&container)
            .query(&mut con)
            .expect("COMMAND INFO");
        let Some(redis::Value::Array(mut entry)) = info.into_iter().next() else {
            failures.push(format!("{name}: COMMAND INFO returned nothing"));
            continue;
        };
        if sub.is_some() {
            let subs = match entry.get(9) {
                Some(redis::Value::Array(subs)) => subs.clone(),
                _ => Vec::new(),
            };
            let found = subs.into_iter().find_map(|s| match s {
                redis::Value::Array(fields) => {
                    let n: String = redis::from_redis_value(fields.first()?.clone()).ok()?;
                    n.eq_ignore_ascii_case(&name).then_some(fields)
                }
                _ => None,
            });
            let Some(fields) = found else {
                failures.push(format!("{name}: subcommand not reported by the server"));
                continue;
            };
            entry = fields;
        }
        let arity: i64 = entry
            .get(1)
            .and_then(|v| redis::from_redis_value(v.clone()).ok())
            .unwrap_or(i64::MIN);
        let n_specs = match entry.get(8) {
            Some(redis::Value::Array(specs)) => specs.len(),
            _ => usize::MAX,
        };
        if arity != i64::from(spec.arity) || n_specs != spec.key_specs.len() {
            failures.push(format!(
                "{name}: table arity {} / {} key specs, server {arity} / {n_specs}",
                spec.arity,
                spec.key_specs.len()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
