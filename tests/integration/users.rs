//! nearcache's own users (`[[users]]`): the same users set up in a real
//! Redis with `ACL SETUSER` and in nearcache (in front of a Redis with no
//! users) answer every command of a matrix byte for byte alike — commands
//! by category, keys read and written, channels, MULTI, EVAL's declared
//! keys, wrong passwords, a disabled user — over RESP2 and RESP3, with
//! redis-cli and the redis crate. Reads that L1 answers are checked as
//! strictly as those that go upstream.

use std::time::Duration;

use bytes::Bytes;
use nearcache::config::{Config, RuleConfig, UserConfig};

use crate::compat::Raw;
use crate::support::{ProxyProcess, RedisServer, TestProxy, config_for, redis_cli, wait_until};

const LIMIT: Duration = Duration::from_secs(10);

/// One user, as both sides are told: `(name, password, commands, keys,
/// channels)`, each rule string in Redis's ACL syntax.
struct Spec {
    name: &'static str,
    password: &'static str,
    commands: &'static str,
    keys: &'static str,
    channels: &'static str,
    enabled: bool,
}

const USERS: &[Spec] = &[
    // A dashboard: reads market data, nothing else.
    Spec {
        name: "reader",
        password: "reader-pw",
        commands: "+@read +@connection +ping",
        keys: "~ticker:* ~book:*",
        channels: "",
        enabled: true,
    },
    // A bot: reads prices, writes its signals and an audit trail it cannot
    // read back, publishes on prices:*, and no dangerous command.
    Spec {
        name: "trader",
        password: "trader-pw",
        commands: "+@read +@write +@connection +@transaction +@pubsub +@scripting -@dangerous",
        keys: "%R~ticker:* ~signal:* %W~audit:*",
        channels: "&prices:*",
        enabled: true,
    },
    Spec {
        name: "retired",
        password: "retired-pw",
        commands: "+@all",
        keys: "~*",
        channels: "&*",
        enabled: false,
    },
];

fn user_config(u: &Spec) -> UserConfig {
    UserConfig {
        name: u.name.into(),
        passwords: vec![nearcache::acl::hash_password(u.password.as_bytes())],
        enabled: u.enabled,
        commands: u.commands.into(),
        keys: u.keys.into(),
        channels: u.channels.into(),
        ..UserConfig::default()
    }
}

/// The `[[users]]` of `USERS`, plus Redis's own default user (everything,
/// no password) so a client that never authenticates is treated alike.
fn users() -> Vec<UserConfig> {
    let mut all: Vec<UserConfig> = USERS.iter().map(user_config).collect();
    all.push(UserConfig {
        name: "default".into(),
        nopass: true,
        commands: "+@all".into(),
        keys: "~*".into(),
        channels: "&*".into(),
        ..UserConfig::default()
    });
    all
}

/// Market data both Redises start with.
fn seed(redis: &RedisServer) {
    let mut c = redis.direct();
    for (k, v) in [
        ("ticker:btc", "97000"),
        ("book:btc", "97000x2"),
        ("orders:1", "secret-order"),
        ("audit:0", "x"),
    ] {
        let _: () = redis::cmd("SET").arg(k).arg(v).query(&mut c).unwrap();
    }
}

/// A Redis whose users are `USERS`, as Redis's ACL knows them.
fn redis_with_acl() -> RedisServer {
    let redis = RedisServer::start();
    let mut c = redis.direct();
    for u in USERS {
        let mut rule = vec![
            u.name.to_owned(),
            if u.enabled { "on" } else { "off" }.to_owned(),
            format!(">{}", u.password),
            "resetchannels".to_owned(),
        ];
        for part in [u.commands, u.keys, u.channels] {
            rule.extend(part.split_whitespace().map(str::to_owned));
        }
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&rule)
            .query(&mut c)
            .unwrap();
    }
    seed(&redis);
    redis
}

/// nearcache enforcing `USERS` in front of a Redis with no users of its
/// own, caching `ticker:` and `book:` so reads are L1 hits too.
async fn proxy_with_users() -> (RedisServer, TestProxy) {
    let redis = RedisServer::start();
    seed(&redis);
    let mut cfg = config_for(&redis);
    cfg.users = users();
    cfg.cache.rules = vec![
        RuleConfig::caching("ticker:", Duration::from_secs(60)),
        RuleConfig::caching("book:", Duration::from_secs(60)),
        RuleConfig::caching("orders:", Duration::from_secs(60)),
    ];
    let proxy = TestProxy::start_with(cfg).await;
    (redis, proxy)
}

/// The matrix each user runs after authenticating.
const MATRIX: &[&[&str]] = &[
    &["ACL", "WHOAMI"],
    // Reads of allowed, read-only, write-only and foreign keys (twice: the
    // second of an allowed cached read is an L1 hit).
    &["GET", "ticker:btc"],
    &["GET", "ticker:btc"],
    &["GET", "book:btc"],
    &["GET", "orders:1"],
    &["GET", "audit:0"],
    &["STRLEN", "orders:1"],
    // Writes.
    &["SET", "ticker:btc", "1"],
    &["SET", "signal:btc", "buy"],
    &["GET", "signal:btc"],
    &["SET", "audit:1", "bought"],
    &["APPEND", "audit:1", "-more"],
    &["SET", "orders:1", "stolen"],
    // Every key of a multi-key command.
    &["MGET", "ticker:btc", "signal:btc"],
    &["MGET", "ticker:btc", "orders:1"],
    &["MSET", "signal:a", "1", "audit:2", "2"],
    &["MSET", "signal:a", "1", "orders:2", "2"],
    &["DEL", "signal:a", "orders:2"],
    &["DEL", "signal:a"],
    // A key read and written by one command.
    &["COPY", "ticker:btc", "signal:copy"],
    &["COPY", "signal:btc", "ticker:eth"],
    // Categories: dangerous, admin, a container's subcommands.
    &["KEYS", "ticker:*"],
    &["FLUSHALL"],
    &["CONFIG", "GET", "maxmemory"],
    &["CLIENT", "KILL", "ID", "999999"],
    &["ACL", "SETUSER", "mallory", "on", "+@all"],
    &["PING"],
    &["ECHO", "hi"],
    &["INCR", "signal:n"],
    // Channels.
    &["PUBLISH", "prices:btc", "97001"],
    &["PUBLISH", "orders", "x"],
    // Scripts: the declared keys are checked, as every key of a command.
    &[
        "EVAL",
        "return redis.call('GET', KEYS[1])",
        "1",
        "ticker:btc",
    ],
    &["EVAL", "return redis.call('GET', KEYS[1])", "1", "orders:1"],
    &["EVAL", "return 1", "0"],
    // A transaction with a refused command aborts at EXEC.
    &["MULTI"],
    &["SET", "signal:tx", "1"],
    &["SET", "orders:tx", "1"],
    &["EXEC"],
    &["GET", "signal:tx"],
    // A transaction of allowed commands runs.
    &["MULTI"],
    &["INCR", "signal:tx2"],
    &["GET", "ticker:btc"],
    &["EXEC"],
];

/// What `port` answers to the matrix, for each user and for wrong and
/// disabled credentials; `hello` picks `HELLO 3` (RESP3) before it.
async fn run_matrix(port: u16, resp3: bool) -> Vec<(String, Bytes)> {
    let mut seen = Vec::new();
    let mut record = |what: String, reply: Bytes| seen.push((what, reply));
    // The default user reads an order first: through nearcache it is then
    // in L1, and a user who may not read it must be refused all the same.
    let mut anyone = Raw::connect(port).await;
    record(
        "default: GET orders:1".into(),
        anyone.cmd(&["GET", "orders:1"]).await,
    );
    for who in ["reader", "trader"] {
        let password = USERS.iter().find(|u| u.name == who).unwrap().password;
        let mut c = if resp3 {
            Raw::connect_resp3(port).await
        } else {
            Raw::connect(port).await
        };
        record(
            format!("{who}: AUTH"),
            c.cmd(&["AUTH", who, password]).await,
        );
        for cmd in MATRIX {
            record(format!("{who}: {}", cmd.join(" ")), c.cmd(cmd).await);
        }
        // SUBSCRIBE last: it changes what the connection may send.
        record(
            format!("{who}: SUBSCRIBE orders"),
            c.cmd(&["SUBSCRIBE", "orders"]).await,
        );
        if who == "trader" {
            record(
                format!("{who}: SUBSCRIBE prices:btc"),
                c.cmd(&["SUBSCRIBE", "prices:btc"]).await,
            );
            // A relay: the refusal takes its place among the replies.
            record(
                format!("{who}: (subscribed) SUBSCRIBE orders"),
                c.cmd(&["SUBSCRIBE", "orders"]).await,
            );
            record(
                format!("{who}: (subscribed) PSUBSCRIBE prices:*"),
                c.cmd(&["PSUBSCRIBE", "prices:*"]).await,
            );
        }
    }
    // Who cannot get in.
    let mut c = Raw::connect(port).await;
    for cmd in [
        &["AUTH", "trader", "wrong"][..],
        &["AUTH", "retired", "retired-pw"],
        &["AUTH", "nobody", "x"],
        &["HELLO", "2", "AUTH", "trader", "wrong"],
        &["HELLO", "3", "AUTH", "retired", "retired-pw"],
        // Still the default user after all of that.
        &["ACL", "WHOAMI"],
    ] {
        record(format!("anyone: {}", cmd.join(" ")), c.cmd(cmd).await);
    }
    seen
}

async fn differential(resp3: bool) {
    let direct_redis = redis_with_acl();
    let direct = run_matrix(direct_redis.port(), resp3).await;
    // The matrix means something: each kind of refusal occurs, and so do
    // successes.
    let text = |r: &Bytes| String::from_utf8_lossy(r).into_owned();
    let replies: Vec<String> = direct.iter().map(|(_, r)| text(r)).collect();
    for expected in [
        "to run the 'flushall' command",
        "to run the 'acl|setuser' command",
        "to access one of the keys",
        "to access one of the channels",
        "EXECABORT",
        "WRONGPASS",
        "97000",
    ] {
        assert!(
            replies.iter().any(|r| r.contains(expected)),
            "directly, no reply has {expected:?}: {direct:#?}"
        );
    }
    let (_upstream, proxy) = proxy_with_users().await;
    let proxied = run_matrix(proxy.port(), resp3).await;
    for ((what, want), (_, got)) in direct.iter().zip(&proxied) {
        assert_eq!(
            text(got),
            text(want),
            "{what}: through nearcache (left) and Redis with the same users (right)"
        );
    }
    assert_eq!(direct.len(), proxied.len());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_refused_what_redis_refuses_them_resp2() {
    differential(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_refused_what_redis_refuses_them_resp3() {
    differential(true).await;
}

/// The redis crate (RESP2 and RESP3, credentials in the URL) and redis-cli
/// see the refusals as the errors they know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_authenticate_and_see_noperm() {
    let (_redis, proxy) = proxy_with_users().await;
    for proto in ["", "?protocol=resp3"] {
        let url = format!(
            "redis://reader:reader-pw@127.0.0.1:{}/{proto}",
            proxy.port()
        );
        let mut c = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let price: String = redis::cmd("GET")
            .arg("ticker:btc")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(price, "97000");
        let err = redis::cmd("SET")
            .arg("ticker:btc")
            .arg("1")
            .query_async::<()>(&mut c)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("NOPERM"), "{url}: {err}");
        let err = redis::cmd("GET")
            .arg("orders:1")
            .query_async::<String>(&mut c)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("NOPERM"), "{url}: {err}");
        let wrong = format!("redis://reader:nope@127.0.0.1:{}/{proto}", proxy.port());
        let err = redis::Client::open(wrong.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .map(|_| ())
            .unwrap_err();
        // (RESP2's AUTH fails as AuthenticationFailed; RESP3's HELLO as the
        // server's WRONGPASS, in this crate as against Redis.)
        assert!(
            err.kind() == redis::ErrorKind::AuthenticationFailed || err.code() == Some("WRONGPASS"),
            "{wrong}: {err}"
        );
    }
    let cli = |args: &[&str]| {
        let mut all = vec![
            "--user",
            "trader",
            "--pass",
            "trader-pw",
            "--no-auth-warning",
        ];
        all.extend_from_slice(args);
        redis_cli(proxy.port(), &all, None)
    };
    assert_eq!(cli(&["SET", "signal:cli", "sell"]), "OK\n");
    assert_eq!(
        cli(&["FLUSHALL"]).trim_end(),
        "NOPERM this user has no permissions to run the 'flushall' command"
    );
    assert_eq!(cli(&["GET", "signal:cli"]), "sell\n");
    proxy.shutdown().await;
}

/// With users and no default user, a client must authenticate first, and a
/// failed AUTH costs the upstream nothing: a brute force is answered by
/// nearcache alone while other clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_default_user_clients_must_authenticate_and_failures_stay_local() {
    let redis = RedisServer::start();
    seed(&redis);
    let mut cfg: Config = config_for(&redis);
    cfg.users = USERS.iter().map(user_config).collect();
    let proxy = TestProxy::start_with(cfg).await;
    let mut anon = Raw::connect(proxy.port()).await;
    assert_eq!(
        &anon.cmd(&["GET", "ticker:btc"]).await[..],
        b"-NOAUTH Authentication required.\r\n"
    );
    redis.reset_stats();
    let port = proxy.port();
    let guessers: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = Raw::connect(port).await;
                for n in 0..500 {
                    let guess = format!("guess-{i}-{n}");
                    let reply = c.cmd(&["AUTH", "trader", &guess]).await;
                    assert!(reply.starts_with(b"-WRONGPASS"), "{reply:?}");
                }
            })
        })
        .collect();
    let mut reader = Raw::connect(port).await;
    assert_eq!(
        &reader.cmd(&["AUTH", "reader", "reader-pw"]).await[..],
        b"+OK\r\n"
    );
    for _ in 0..200 {
        assert_eq!(
            &reader.cmd(&["GET", "ticker:btc"]).await[..],
            b"$5\r\n97000\r\n"
        );
    }
    for g in guessers {
        g.await.unwrap();
    }
    assert_eq!(redis.calls("auth"), 0, "failed AUTHs never reach Redis");
    assert_eq!(redis.calls("get"), 200);
    proxy.shutdown().await;
}

/// `server.deny` and `server.rename` fence commands for every client, in
/// every mode: a denied command says so, a renamed one is unknown under its
/// old name, as with Redis's `rename-command`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_and_renamed_commands_are_fenced_for_everyone() {
    let redis = RedisServer::start();
    seed(&redis);
    let mut cfg = config_for(&redis);
    cfg.server.deny = vec!["flushall".into(), "keys".into(), "client|kill".into()];
    cfg.server.rename = [
        ("config".to_owned(), "ops-config".to_owned()),
        ("debug".to_owned(), String::new()),
    ]
    .into();
    let proxy = TestProxy::start_with(cfg).await;
    let mut c = Raw::connect(proxy.port()).await;
    let text = |b: Bytes| String::from_utf8_lossy(&b).into_owned();
    let denied = |name: &str| format!("-ERR '{name}' is denied by this proxy (server.deny)\r\n");
    assert_eq!(text(c.cmd(&["FLUSHALL"]).await), denied("flushall"));
    assert_eq!(text(c.cmd(&["KEYS", "*"]).await), denied("keys"));
    assert_eq!(
        text(c.cmd(&["CLIENT", "KILL", "ID", "1"]).await),
        denied("client|kill"),
        "a denied subcommand"
    );
    assert_eq!(
        &c.cmd(&["CLIENT", "ID"]).await[..1],
        b":",
        "the container's other subcommands run"
    );
    // Renamed away: unknown, as with Redis's rename-command.
    assert!(
        text(c.cmd(&["CONFIG", "GET", "maxmemory"]).await)
            .starts_with("-ERR unknown command 'CONFIG'")
    );
    assert!(
        text(c.cmd(&["DEBUG", "SLEEP", "0"]).await).starts_with("-ERR unknown command 'DEBUG'")
    );
    let renamed = text(c.cmd(&["OPS-CONFIG", "GET", "maxmemory"]).await);
    assert!(
        renamed.starts_with("*2\r\n$9\r\nmaxmemory\r\n"),
        "{renamed}"
    );
    // Inside MULTI a fenced command is refused while queuing: EXEC aborts.
    assert_eq!(&c.cmd(&["MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(text(c.cmd(&["FLUSHALL"]).await), denied("flushall"));
    assert!(text(c.cmd(&["EXEC"]).await).starts_with("-EXECABORT"));
    // Nothing was flushed, and Redis never saw a fenced command.
    assert_eq!(&c.cmd(&["GET", "ticker:btc"]).await[..], b"$5\r\n97000\r\n");
    for cmd in ["flushall", "keys", "debug", "client|kill"] {
        assert_eq!(redis.calls(cmd), 0, "{cmd} reached Redis");
    }
    proxy.shutdown().await;
}

/// A reload changes what an already connected, already authenticated
/// client may do, on its very next command; a user removed from the file
/// may run nothing more on the connections it has open.
#[test]
fn a_reload_changes_the_permissions_of_connected_clients() {
    let redis = RedisServer::start();
    seed(&redis);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nearcache.toml");
    let file = |keys: &str| {
        format!(
            "[upstream]\nurl = \"{}\"\n\
             [[users]]\nname = \"reader\"\npasswords = [\"{}\"]\n\
             commands = \"+@read +@connection\"\nkeys = \"{keys}\"\n",
            redis.url(),
            nearcache::acl::hash_password(b"reader-pw"),
        )
    };
    std::fs::write(&path, file("~ticker:*")).unwrap();
    let proxy = ProxyProcess::start_args(&["--config", path.to_str().unwrap()]);
    let mut c = redis::Client::open(format!(
        "redis://reader:reader-pw@127.0.0.1:{}",
        proxy.port()
    ))
    .unwrap()
    .get_connection()
    .unwrap();
    let get = |c: &mut redis::Connection, key: &str| {
        redis::cmd("GET")
            .arg(key)
            .query::<String>(c)
            .map_err(|e| e.code().unwrap_or_default().to_owned())
    };
    assert_eq!(get(&mut c, "ticker:btc"), Ok("97000".into()));
    assert_eq!(get(&mut c, "book:btc"), Err("NOPERM".into()));

    let reloaded = |proxy: &ProxyProcess| proxy.log().matches("configuration reloaded").count();
    let before = reloaded(&proxy);
    std::fs::write(&path, file("~book:*")).unwrap();
    proxy.signal("HUP");
    wait_until("the reload", LIMIT, || reloaded(&proxy) > before);
    assert_eq!(get(&mut c, "book:btc"), Ok("97000x2".into()));
    assert_eq!(get(&mut c, "ticker:btc"), Err("NOPERM".into()));

    let before = reloaded(&proxy);
    let without_reader = file("~book:*").replace("name = \"reader\"", "name = \"ops\"");
    std::fs::write(&path, without_reader).unwrap();
    proxy.signal("HUP");
    wait_until("the reload", LIMIT, || reloaded(&proxy) > before);
    assert_eq!(get(&mut c, "book:btc"), Err("NOPERM".into()));
}

/// `nearcache hash-password` prints what `sha256sum` prints for the
/// password read from stdin (its line ending not included), and refuses an
/// empty one.
#[test]
fn hash_password_prints_the_sha256_of_stdin() {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let run = |program: &str, args: &[&str], input: &[u8]| {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let binary = ProxyProcess::binary().to_str().unwrap();
    let ours = run(binary, &["hash-password"], b"s3cret pw\n");
    assert!(ours.status.success());
    let theirs = run("sha256sum", &[], b"s3cret pw");
    let expected = String::from_utf8(theirs.stdout).unwrap();
    assert_eq!(
        String::from_utf8(ours.stdout).unwrap().trim(),
        expected.split_whitespace().next().unwrap()
    );
    let empty = run(binary, &["hash-password"], b"\n");
    assert!(!empty.status.success());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("no password on stdin"));
}

/// `PROXY …` is for users with `admin = true` only: another user's is
/// refused as Redis refuses a command it may not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_commands_need_an_admin_user() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.users = users();
    cfg.users.push(UserConfig {
        admin: true,
        ..user_config(&Spec {
            name: "ops",
            password: "ops-pw",
            commands: "+@all",
            keys: "~*",
            channels: "&*",
            enabled: true,
        })
    });
    let proxy = TestProxy::start_with(cfg).await;
    let mut c = Raw::connect(proxy.port()).await;
    assert_eq!(
        &c.cmd(&["AUTH", "trader", "trader-pw"]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(
        &c.cmd(&["PROXY", "STATS"]).await[..],
        b"-NOPERM this user has no permissions to run the 'proxy' command\r\n"
    );
    // Not even the default user, with every Redis permission.
    let mut anyone = Raw::connect(proxy.port()).await;
    assert!(
        anyone
            .cmd(&["PROXY", "RULES"])
            .await
            .starts_with(b"-NOPERM")
    );
    assert_eq!(&c.cmd(&["AUTH", "ops", "ops-pw"]).await[..], b"+OK\r\n");
    let stats = c.cmd(&["PROXY", "STATS"]).await;
    assert!(!stats.starts_with(b"-"), "{stats:?}");
    assert_eq!(&c.cmd(&["ACL", "WHOAMI"]).await[..], b"$3\r\nops\r\n");
    proxy.shutdown().await;
}
