//! Hot reload, with the built binary and real signals: `SIGHUP` and
//! `PROXY RELOAD` read the `--config` file again and apply the key rules,
//! `server.password` and a rotated upstream password while clients stay
//! connected; a broken file changes nothing and its error names the file and
//! the field; a field that takes a restart is named, not silently ignored.
//! Caching is observed, not assumed: a value changed in Redis behind the
//! proxy's back (no bus, so no invalidation) is still answered from L1 while
//! a rule caches it, and answered fresh once the rule no longer does.

use std::path::PathBuf;
use std::time::Duration;

use crate::support::{ProxyProcess, RedisServer, UPSTREAM_LOST, redis_cli, wait_until};

const LIMIT: Duration = Duration::from_secs(10);
const RELOADED: &str = "SIGHUP: configuration reloaded";
const NOT_RELOADED: &str = "configuration not reloaded";
const TAKES_RESTART: &str = "these changes take a restart";

/// A config file the test rewrites between reloads.
struct ConfigFile {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ConfigFile {
    fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nearcache.toml");
        std::fs::write(&path, text).unwrap();
        ConfigFile { path, _dir: dir }
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap();
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

/// `[[cache.rules]]` tables, one per `(prefix, body)`.
fn rules(rules: &[(&str, &str)]) -> String {
    rules
        .iter()
        .map(|(prefix, body)| format!("[[cache.rules]]\nprefix = \"{prefix}\"\n{body}\n"))
        .collect()
}

/// Sends SIGHUP and waits for the reload's log line (`outcome`) to appear
/// once more than before.
fn sighup(proxy: &ProxyProcess, outcome: &str) {
    let before = proxy.log().matches(outcome).count();
    proxy.signal("HUP");
    wait_until(&format!("the log line {outcome:?}"), LIMIT, || {
        proxy.log().matches(outcome).count() > before
    });
}

fn get(conn: &mut redis::Connection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query(conn).unwrap()
}

fn set(conn: &mut redis::Connection, key: &str, value: &str) {
    let _: () = redis::cmd("SET").arg(key).arg(value).query(conn).unwrap();
}

fn client_id(conn: &mut redis::Connection) -> i64 {
    redis::cmd("CLIENT").arg("ID").query(conn).unwrap()
}

fn connect(proxy: &ProxyProcess) -> redis::Connection {
    redis::Client::open(proxy.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

/// Fills `key` with `cached` through the proxy, then changes it to `behind`
/// straight in Redis; returns what the proxy answers now.
fn cache_then_change_behind(
    proxy: &mut redis::Connection,
    redis: &mut redis::Connection,
    key: &str,
    cached: &str,
    behind: &str,
) -> Option<String> {
    set(redis, key, cached);
    assert_eq!(get(proxy, key).as_deref(), Some(cached));
    set(redis, key, behind);
    get(proxy, key)
}

fn start(redis: &RedisServer, file: &ConfigFile) -> ProxyProcess {
    ProxyProcess::start(redis, &["--config", file.path()])
}

#[test]
fn sighup_swaps_the_rules_and_drops_only_the_keys_whose_rule_changed() {
    let redis = RedisServer::start();
    let file = ConfigFile::new(&rules(&[("t:", "ttl = \"60s\""), ("c:", "ttl = \"60s\"")]));
    let proxy = start(&redis, &file);
    let mut conn = connect(&proxy);
    let mut direct = redis.direct();
    let id = client_id(&mut conn);
    assert_eq!(
        cache_then_change_behind(&mut conn, &mut direct, "t:1", "v1", "v2").as_deref(),
        Some("v1"),
        "t: is cached before the reload"
    );
    assert_eq!(
        cache_then_change_behind(&mut conn, &mut direct, "c:1", "c1", "c2").as_deref(),
        Some("c1"),
        "c: is cached before the reload"
    );

    // t:'s ttl changes: the entry cached under the old rule goes, and the
    // new rule caches again.
    file.write(&rules(&[("t:", "ttl = \"30s\""), ("c:", "ttl = \"60s\"")]));
    sighup(&proxy, RELOADED);
    assert_eq!(
        get(&mut conn, "t:1").as_deref(),
        Some("v2"),
        "the entry cached under the old t: rule is dropped"
    );
    set(&mut direct, "t:1", "v3");
    assert_eq!(
        get(&mut conn, "t:1").as_deref(),
        Some("v2"),
        "t: is cached under its new rule"
    );
    assert_eq!(
        get(&mut conn, "c:1").as_deref(),
        Some("c1"),
        "c:'s rule did not change, so its entry stays"
    );

    // t: stops being cached.
    file.write(&rules(&[("t:", "cache = false"), ("c:", "ttl = \"60s\"")]));
    sighup(&proxy, RELOADED);
    assert_eq!(
        get(&mut conn, "t:1").as_deref(),
        Some("v3"),
        "t: is not cached any more"
    );
    assert_eq!(client_id(&mut conn), id, "the client kept its connection");
    assert!(
        proxy.log_text().contains("rules_changed=1"),
        "{}",
        proxy.log_text()
    );
}

#[test]
fn a_broken_file_changes_nothing_and_its_error_names_the_file_and_field() {
    let redis = RedisServer::start();
    let file = ConfigFile::new(&rules(&[("t:", "ttl = \"60s\"")]));
    let proxy = start(&redis, &file);
    proxy.must_log(NOT_RELOADED);
    let mut conn = connect(&proxy);
    let mut direct = redis.direct();
    assert_eq!(
        cache_then_change_behind(&mut conn, &mut direct, "t:1", "v1", "v2").as_deref(),
        Some("v1")
    );

    // Does not parse: the line and the reason.
    file.write(&rules(&[("t:", "ttl = \"soon\"")]));
    sighup(&proxy, NOT_RELOADED);
    let log = proxy.log();
    assert!(log.contains(file.path()), "{log}");
    assert!(log.contains("'soon' is not a duration"), "{log}");

    // Parses but does not validate: the field.
    file.write(&rules(&[("t:", "")]));
    let reply = redis_cli(proxy.port(), &["PROXY", "RELOAD"], None);
    let reply = reply.trim();
    assert!(reply.starts_with("ERR reload failed: "), "{reply}");
    assert!(reply.contains(file.path()), "{reply}");
    assert!(
        reply.contains("cache.rules[0] (prefix \"t:\").ttl: must be more than 0"),
        "{reply}"
    );
    assert_eq!(reply.lines().count(), 1, "one line: {reply}");

    assert_eq!(
        get(&mut conn, "t:1").as_deref(),
        Some("v1"),
        "the running rules and their entries are untouched"
    );

    file.write(&rules(&[("t:", "cache = false")]));
    assert_eq!(redis_cli(proxy.port(), &["PROXY", "RELOAD"], None), "OK\n");
    assert_eq!(get(&mut conn, "t:1").as_deref(), Some("v2"));
}

#[test]
fn a_change_that_takes_a_restart_is_named_and_the_rest_applies() {
    let redis = RedisServer::start();
    let file = ConfigFile::new(&format!(
        "[upstream]\npool_size = 2\n{}",
        rules(&[("t:", "ttl = \"60s\"")])
    ));
    let proxy = start(&redis, &file);
    proxy.must_log(TAKES_RESTART);
    let mut conn = connect(&proxy);
    let mut direct = redis.direct();
    assert_eq!(
        cache_then_change_behind(&mut conn, &mut direct, "t:1", "v1", "v2").as_deref(),
        Some("v1")
    );

    file.write(&format!(
        "[upstream]\npool_size = 4\n[server]\nmax_clients = 5\n{}",
        rules(&[("t:", "cache = false")])
    ));
    let reply = redis_cli(proxy.port(), &["PROXY", "RELOAD"], None);
    assert_eq!(
        reply,
        "OK reloaded; these changes take a restart: server.max_clients, upstream.pool_size\n"
    );
    assert!(
        proxy
            .log_text()
            .contains("restart_needed=server.max_clients, upstream.pool_size"),
        "{}",
        proxy.log_text()
    );
    assert_eq!(
        get(&mut conn, "t:1").as_deref(),
        Some("v2"),
        "the rules applied"
    );

    // A flag given at start still wins over the file (so is no change).
    file.write(&format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n[upstream]\npool_size = 2\n{}",
        rules(&[("t:", "cache = false")])
    ));
    assert_eq!(redis_cli(proxy.port(), &["PROXY", "RELOAD"], None), "OK\n");
}

#[test]
fn a_new_server_password_applies_to_the_next_auth_and_keeps_clients_connected() {
    let redis = RedisServer::start();
    let file = ConfigFile::new("[server]\npassword = \"first\"\n");
    let proxy = start(&redis, &file);
    let mut authed = redis::Client::open(format!("redis://:first@127.0.0.1:{}", proxy.port()))
        .unwrap()
        .get_connection()
        .unwrap();
    let id = client_id(&mut authed);

    file.write("[server]\npassword = \"second\"\n");
    sighup(&proxy, RELOADED);

    let auth = |password: &str| {
        redis_cli(proxy.port(), &["AUTH", password], None)
            .trim()
            .to_owned()
    };
    assert_eq!(
        auth("first"),
        "WRONGPASS invalid username-password pair or user is disabled."
    );
    assert_eq!(auth("second"), "OK");
    assert_eq!(client_id(&mut authed), id, "an authenticated client stays");

    file.write("");
    sighup(&proxy, RELOADED);
    assert_eq!(
        redis_cli(proxy.port(), &["PING"], None),
        "PONG\n",
        "no password: no AUTH needed"
    );
}

/// Redis's user `bot`, with `password`; the default user stays open for the
/// test's direct connections.
fn set_bot_password(redis: &RedisServer, password: &str) {
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "bot",
            "on",
            "resetpass",
            &format!(">{password}"),
            "~*",
            "+@all",
        ])
        .query(&mut redis.direct())
        .unwrap();
}

fn upstream_as_bot(redis: &RedisServer, password: &str) -> String {
    format!(
        "[upstream]\nurl = \"redis://bot:{password}@127.0.0.1:{}\"\n",
        redis.port()
    )
}

#[test]
fn a_rotated_upstream_password_is_used_for_the_next_connections() {
    let redis = RedisServer::start();
    set_bot_password(&redis, "old");
    let file = ConfigFile::new(&upstream_as_bot(&redis, "old"));
    // The upstream from the file only: a flag would win over it.
    let proxy = ProxyProcess::start_args(&["--config", file.path()]);
    proxy.expect_log(UPSTREAM_LOST);
    let mut conn = connect(&proxy);
    set(&mut conn, "k", "before");

    // The rotation: Redis first, then the file, then connections renewed.
    set_bot_password(&redis, "new");
    file.write(&upstream_as_bot(&redis, "new"));
    sighup(&proxy, RELOADED);
    let killed: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "USER", "bot"])
        .query(&mut redis.direct())
        .unwrap();
    assert!(killed > 0, "the proxy's connections ran as bot");

    // Reconnected with the new password (with the old one Redis would
    // refuse them: WRONGPASS, and this would fail).
    // (A SET meeting a killed connection closes the client, as Redis's
    // own closing would: connect again then.)
    wait_until("the proxy to reach Redis again", LIMIT, || {
        let ok = redis::cmd("SET")
            .arg("k")
            .arg("after")
            .query::<()>(&mut conn)
            .is_ok();
        if !ok {
            conn = connect(&proxy);
        }
        ok
    });
    let as_bot: String = redis::cmd("ACL").arg("WHOAMI").query(&mut conn).unwrap();
    assert_eq!(as_bot, "bot");
    let value: String = redis::cmd("GET")
        .arg("k")
        .query(&mut redis.direct())
        .unwrap();
    assert_eq!(value, "after");
}

/// Redis's ids of the connections authenticated as `bot`.
fn bot_connections(redis: &RedisServer) -> std::collections::BTreeSet<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut redis.direct())
        .unwrap();
    list.lines()
        .filter(|l| l.split(' ').any(|f| f == "user=bot"))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_rotated_upstream_password_replaces_the_open_connections_with_no_client_error() {
    let redis = RedisServer::start();
    set_bot_password(&redis, "old");
    let file = ConfigFile::new(&upstream_as_bot(&redis, "old"));
    let proxy = ProxyProcess::start_args(&["--config", file.path()]);
    proxy.expect_log(UPSTREAM_LOST);
    let mut conn = connect(&proxy);
    // Shared, scripts' and dedicated connections all in use.
    let round = |conn: &mut redis::Connection, i: usize| {
        set(conn, "k", &i.to_string());
        let _: i64 = redis::cmd("EVAL")
            .arg(&["return 1", "0"])
            .query(conn)
            .unwrap();
        let (n,): (i64,) = redis::pipe()
            .atomic()
            .cmd("INCR")
            .arg("n")
            .query(conn)
            .unwrap();
        assert_eq!(n, i as i64 + 1, "every transaction ran once");
    };
    round(&mut conn, 0);
    let before = bot_connections(&redis);
    assert!(!before.is_empty());

    // Redis keeps connections authenticated under a password it no longer
    // has: only nearcache replacing them retires the old password.
    set_bot_password(&redis, "new");
    file.write(&upstream_as_bot(&redis, "new"));
    sighup(&proxy, RELOADED);
    let mut i = 1;
    wait_until(
        "every connection made with the old password to close",
        LIMIT,
        || {
            round(&mut conn, i);
            i += 1;
            bot_connections(&redis).is_disjoint(&before)
        },
    );
    proxy.expect_log("renewed with the rotated credentials");
    let value: String = redis::cmd("GET")
        .arg("k")
        .query(&mut redis.direct())
        .unwrap();
    assert_eq!(value, (i - 1).to_string());
}

#[test]
fn without_a_config_file_sighup_is_logged_and_ignored_and_term_is_logged() {
    let redis = RedisServer::start();
    let mut proxy = ProxyProcess::start(&redis, &[]);
    proxy.must_log("ignored: no configuration file to reload");
    sighup(&proxy, "SIGHUP ignored");
    assert_eq!(redis_cli(proxy.port(), &["PING"], None), "PONG\n");
    let reply = redis_cli(proxy.port(), &["PROXY", "RELOAD"], None);
    assert_eq!(
        reply.trim(),
        "ERR reload failed: no configuration file to reload (nearcache started without --config)"
    );

    proxy.signal("TERM");
    let status = proxy.wait_exit(LIMIT);
    assert!(status.success(), "{status}");
    assert!(proxy.log().contains("SIGTERM"), "{}", proxy.log());
}

#[test]
fn sigint_is_logged_and_exits_cleanly() {
    let redis = RedisServer::start();
    let mut proxy = ProxyProcess::start(&redis, &[]);
    proxy.signal("INT");
    let status = proxy.wait_exit(LIMIT);
    assert!(status.success(), "{status}");
    let log = proxy.log();
    assert!(log.contains("SIGINT"), "{log}");
    assert!(log.contains("bye"), "{log}");
}

#[test]
fn a_limit_added_by_reload_applies_to_live_connections_and_a_broken_one_changes_nothing() {
    let redis = RedisServer::start();
    let file = ConfigFile::new("");
    let proxy = start(&redis, &file);
    proxy.must_log(NOT_RELOADED);
    let mut conn = connect(&proxy);
    let id = client_id(&mut conn);
    for _ in 0..5 {
        assert_eq!(get(&mut conn, "k"), None, "no limit yet");
    }
    let limit = "[[limits]]\nname = \"gets\"\nrate = \"1/m\"\nburst = 2\ncommands = [\"GET\"]\n";
    file.write(limit);
    sighup(&proxy, RELOADED);
    let mut replies = Vec::new();
    for _ in 0..3 {
        let r: redis::RedisResult<Option<String>> = redis::cmd("GET").arg("k").query(&mut conn);
        replies.push(r.map_err(|e| e.to_string()));
    }
    assert_eq!(replies[..2], [Ok(None), Ok(None)], "the burst");
    let refused = replies[2].clone().unwrap_err();
    assert!(
        refused.contains("rate limited by 'gets' (1/m)"),
        "{refused}"
    );
    assert_eq!(client_id(&mut conn), id, "the client kept its connection");

    // A limit naming no command: nothing changes, the field is named.
    file.write(&limit.replace("GET", "GETT"));
    sighup(&proxy, NOT_RELOADED);
    let log = proxy.log_text();
    assert!(
        log.contains("limits[0] (\"gets\").commands: 'GETT' is not a command"),
        "{log}"
    );
    let r: redis::RedisResult<Option<String>> = redis::cmd("GET").arg("k").query(&mut conn);
    assert!(
        r.is_err(),
        "the running limit, its bucket still empty, stays"
    );
}
