//! What the built binary logs, read from its real stderr: no secret ever
//! (passwords, tokens, AUTH and HELLO AUTH arguments, credentials in URLs),
//! no colour codes when stderr is a file, JSON lines on request, and an
//! upstream outage as one line when it begins and one when it ends — not a
//! line per connection per retry.

use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{
    NatsServer, ProxyProcess, RedisServer, UPSTREAM_CONNECT_FAILED, UPSTREAM_LOST, free_port,
    http_get, redis_cli, wait_until,
};

const LIMIT: Duration = Duration::from_secs(10);

/// `GET path` on the admin listener with `token`: (status, body).
fn admin_get(port: u16, path: &str, token: &str) -> (u16, String) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    http_get(addr, path, &format!("Authorization: Bearer {token}\r\n"))
}

/// WARN lines from the upstream pool, as a human-format log writes them.
fn upstream_warnings(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(" WARN ") && l.contains("nearcache::upstream"))
        .count()
}

#[test]
fn secrets_are_never_logged_and_stderr_to_a_file_has_no_colour() {
    const UPSTREAM_PW: &str = "up-s3cret-pw";
    const CLIENT_PW: &str = "cli-s3cret-pw";
    const ADMIN_TOKEN: &str = "adm-s3cret-token";
    const NATS_PW: &str = "nats-s3cret-pw";
    const USER_PW: &str = "usr-s3cret-pw";
    let redis = RedisServer::start_with(&["--requirepass", UPSTREAM_PW]);
    let nats = NatsServer::start_with(&["--user", "bus", "--pass", NATS_PW]);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let admin_port = free_port();
    let config = dir.path().join("nearcache.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\npassword = \"{CLIENT_PW}\"\n\
             [upstream]\nurl = \"redis://:{UPSTREAM_PW}@127.0.0.1:{}\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken_file = \"{}\"\n\
             [coherence]\nnats_url = \"nats://bus:{NATS_PW}@127.0.0.1:{}\"\n\
             [[cache.rules]]\nprefix = \"t:\"\nttl = \"60s\"\n\
             [[users]]\nname = \"bot\"\npasswords = [\"{}\"]\ncommands = \"+@all\"\nkeys = \"~*\"\n",
            redis.port(),
            token_file.display(),
            nats.port(),
            nearcache::acl::hash_password(USER_PW.as_bytes()),
        ),
    )
    .unwrap();
    let proxy = ProxyProcess::start_args(&["--config", config.to_str().unwrap()]);
    let port = proxy.port();

    // Every way a secret passes through: AUTH right and wrong, HELLO AUTH,
    // the admin token right and wrong, a reload.
    assert!(redis_cli(port, &["AUTH", "wrong-pw"], None).contains("WRONGPASS"));
    let stdin = format!("AUTH {CLIENT_PW}\nSET t:1 v\nGET t:1\nGET t:1\n");
    let out = redis_cli(port, &[], Some(stdin.as_bytes()));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["OK", "OK", "v", "v"],
        "{out}"
    );
    let stdin = format!("AUTH bot {USER_PW}\nSET t:2 v\nAUTH bot not-{USER_PW}\n");
    let out = redis_cli(port, &[], Some(stdin.as_bytes()));
    assert!(out.starts_with("OK\nOK\nWRONGPASS"), "{out}");
    let hello = redis_cli(port, &["HELLO", "3", "AUTH", "default", CLIENT_PW], None);
    assert!(hello.contains("proto"), "{hello}");
    wait_until("the admin listener", LIMIT, || {
        TcpStream::connect(("127.0.0.1", admin_port)).is_ok()
    });
    // What nearcache answers with: errors, the admin endpoints, its
    // configuration, its clients, INFO.
    let mut answered = String::new();
    let (status, refused) = admin_get(admin_port, "/stats", "not-the-token");
    assert_eq!(status, 401);
    answered += &refused;
    for path in ["/stats", "/metrics"] {
        let (status, body) = admin_get(admin_port, path, ADMIN_TOKEN);
        assert_eq!(status, 200, "{path}");
        answered += &body;
    }
    // (Ready or not yet, as the bus connects: its body says why.)
    answered += &admin_get(admin_port, "/readyz", ADMIN_TOKEN).1;
    let stdin = format!(
        "AUTH {CLIENT_PW}\nPROXY CONFIG GET *\nCLIENT LIST\nINFO\nPROXY STATS\nPROXY INFO\n"
    );
    let admin_out = redis_cli(port, &[], Some(stdin.as_bytes()));
    assert!(
        admin_out.contains("server.password") && admin_out.contains("upstream.url"),
        "{admin_out}"
    );
    answered += &admin_out;
    answered += &redis_cli(port, &["AUTH", "wrong-pw"], None);
    answered += &redis_cli(port, &["HELLO", "3", "AUTH", "default", "wrong-pw"], None);

    let before = proxy.log().matches("configuration reloaded").count();
    proxy.signal("HUP");
    wait_until("the reload's log line", LIMIT, || {
        proxy.log().matches("configuration reloaded").count() > before
    });
    // A reload of a broken file whose bad line holds a secret: the error
    // names the place, not the text.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        good.replace(
            &format!("password = \"{CLIENT_PW}\""),
            &format!("password = \"{CLIENT_PW}"),
        ),
    )
    .unwrap();
    proxy.expect_log("configuration not reloaded");
    let rejected = proxy.log().matches("configuration not reloaded").count();
    proxy.signal("HUP");
    wait_until("the broken reload's log line", LIMIT, || {
        proxy.log().matches("configuration not reloaded").count() > rejected
    });
    std::fs::write(&config, good).unwrap();

    // The URL's NATS credentials were used (async-nats takes them only as
    // options).
    wait_until("the bus to connect", LIMIT, || {
        proxy.log().contains("coherence bus connected")
    });
    let log = proxy.log();
    for secret in [UPSTREAM_PW, CLIENT_PW, ADMIN_TOKEN, NATS_PW, USER_PW] {
        assert!(!log.contains(secret), "{secret} was logged:\n{log}");
        assert!(
            !answered.contains(secret),
            "{secret} was answered:\n{answered}"
        );
    }
    // What was loaded is said, with the credentials masked.
    let listening = log
        .lines()
        .find(|l| l.contains("nearcache listening"))
        .unwrap();
    assert!(
        listening.contains("rules=1") && listening.contains("bus=nats://bus:***@"),
        "{listening}"
    );
    assert!(!log.contains('\u{1b}'), "colour codes in a file:\n{log}");
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let redis = RedisServer::start();
    let proxy = ProxyProcess::start_args(&["--upstream", &redis.url(), "--log-format", "json"]);
    assert_eq!(
        redis_cli(proxy.port(), &["SET", "k", "v"], None).trim(),
        "OK"
    );
    let log = proxy.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines.iter().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["message"] == "nearcache listening" && v["upstream"].is_string()
        }),
        "{log}"
    );

    // A format nobody knows is refused before anything starts.
    let out = Command::new(ProxyProcess::binary())
        .args(["check-config", "/dev/null"])
        .env("NEARCACHE_LOG_FORMAT", "xml")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NEARCACHE_LOG_FORMAT") && stderr.contains("xml"),
        "{stderr}"
    );
}

#[test]
fn an_upstream_outage_is_one_line_when_lost_and_one_when_back() {
    let mut redis = RedisServer::start();
    let proxy = ProxyProcess::start(&redis, &[]);
    proxy
        .expect_log(UPSTREAM_LOST)
        .expect_log(UPSTREAM_CONNECT_FAILED);
    let port = proxy.port();
    assert_eq!(redis_cli(port, &["SET", "k", "v"], None).trim(), "OK");

    redis.kill();
    // Requests during the outage wake the supervisors: many retries, each
    // one a DEBUG line (the test's proxy logs at DEBUG), not a warning.
    wait_until("several reconnect attempts", LIMIT, || {
        let _ = redis_cli(port, &["GET", "k"], None);
        proxy.log().matches("upstream connect failed").count() >= 6
    });
    redis.restart();
    wait_until("the line that says it is back", LIMIT, || {
        let _ = redis_cli(port, &["GET", "k"], None);
        proxy.log().contains("upstream back")
    });
    let log = proxy.log();
    assert_eq!(upstream_warnings(&log), 1, "one warning per outage:\n{log}");
    let back: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("upstream back"))
        .collect();
    assert_eq!(back.len(), 1, "{log}");
    assert!(
        back[0].contains(" INFO ") && back[0].contains("after="),
        "{}",
        back[0]
    );
}
