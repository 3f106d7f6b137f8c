//! The admin HTTP listener over real HTTP: `/healthz`, `/readyz` following
//! the upstream, the bearer token, `/metrics` parsed by `promtool check
//! metrics` with counters that move as traffic does, and `/stats`.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use nearcache::config::{LossPolicy, RuleConfig};

use crate::support::{
    BUS_LOST, NatsServer, RedisServer, TestProxy, config_for, http_get, set_then_get, wait_until,
};

/// One admin GET, with the bearer token when given: (status, body).
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    http_get(addr, path, &auth)
}

/// A proxy with the admin listener on a free port and `prefix:` `t:` cached.
async fn proxy(redis: &RedisServer, token: Option<&str>) -> TestProxy {
    let mut cfg = config_for(redis);
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.admin.token = token.map(str::to_owned);
    cfg.cache.rules = vec![RuleConfig::caching("t:", Duration::from_secs(60))];
    TestProxy::start_with(cfg).await
}

/// Sample lines `name{labels} value` → value (comments skipped).
fn samples(exposition: &str) -> HashMap<String, f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Runs `promtool check metrics` on `text`. promtool 2.42 reads the
/// Prometheus 0.0.4 format, where an OpenMetrics counter's `_total` samples
/// are a family of their own without HELP: that lint, and only that one and
/// only for declared counters, is accepted; a parse error or any other
/// problem fails.
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "promtool failed ({:?}): {report}",
        out.status
    );
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        let family = line
            .strip_suffix(" no help text")
            .and_then(|n| n.strip_suffix("_total"))
            .unwrap_or_else(|| panic!("promtool: {line}"));
        assert!(
            text.contains(&format!("# TYPE {family} counter\n")),
            "promtool: {line}"
        );
    }
}

/// Every histogram family: buckets cumulative and monotone, `+Inf` = count.
fn check_histograms(text: &str) {
    let s = samples(text);
    let counts: Vec<&String> = s
        .keys()
        .filter(|k| k.starts_with("nearcache_") && k.contains("_count"))
        .collect();
    assert!(!counts.is_empty(), "histograms exported");
    for count_key in counts {
        let (base, labels) = count_key.split_once("_count").unwrap();
        let inner = labels.trim_start_matches('{').trim_end_matches('}');
        let mut buckets: Vec<(f64, f64)> = s
            .iter()
            .filter(|(k, _)| {
                k.starts_with(&format!("{base}_bucket{{"))
                    && (inner.is_empty() || k.contains(inner))
            })
            .map(|(k, v)| {
                let le = k.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                (le, *v)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        assert!(!buckets.is_empty(), "{count_key} has buckets");
        for w in buckets.windows(2) {
            assert!(w[0].1 <= w[1].1, "{count_key}: buckets not monotone");
        }
        let last = buckets.last().unwrap();
        assert_eq!(last.0, f64::INFINITY, "{count_key} ends at +Inf");
        assert_eq!(last.1, s[count_key], "{count_key} = +Inf bucket");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_follow_the_upstream() {
    let mut redis = RedisServer::start();
    let proxy = proxy(&redis, None).await;
    proxy.expect_log("upstream");
    let admin = proxy.admin_addr();
    // Ready once the first shared connection is up (the pool connects in
    // the background after start).
    let (status, body) = tokio::task::spawn_blocking(move || {
        wait_until("/readyz 200", Duration::from_secs(10), || {
            get(admin, "/readyz", None).0 == 200
        });
        get(admin, "/readyz", None)
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ready\":true"), "{body}");

    redis.kill();
    tokio::task::spawn_blocking(move || {
        wait_until("/readyz 503", Duration::from_secs(10), || {
            get(admin, "/readyz", None).0 == 503
        });
        let (_, body) = get(admin, "/readyz", None);
        assert!(body.contains("upstream unreachable"), "{body}");
        // The process still serves.
        assert_eq!(get(admin, "/healthz", None), (200, "ok\n".into()));
    })
    .await
    .unwrap();

    redis.restart();
    tokio::task::spawn_blocking(move || {
        wait_until("/readyz 200 again", Duration::from_secs(15), || {
            get(admin, "/readyz", None).0 == 200
        });
    })
    .await
    .unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_bus_under_the_bypass_policy() {
    let redis = RedisServer::start();
    let mut nats = NatsServer::start();
    let mut cfg = config_for(&redis);
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.cache.rules = vec![RuleConfig::caching("t:", Duration::from_secs(60))];
    cfg.coherence.nats_url = nats.url();
    assert_eq!(cfg.coherence.loss_policy, LossPolicy::Bypass);
    let proxy = TestProxy::start_with(cfg).await;
    proxy.expect_log(BUS_LOST);
    let admin = proxy.admin_addr();
    let status = move || get(admin, "/readyz", None);
    tokio::task::spawn_blocking(move || {
        wait_until("/readyz 200", Duration::from_secs(10), || status().0 == 200);
        assert!(
            status().1.contains("\"bus\":\"connected\""),
            "{}",
            status().1
        );
    })
    .await
    .unwrap();

    nats.kill();
    tokio::task::spawn_blocking(move || {
        wait_until("/readyz 503", Duration::from_secs(10), || status().0 == 503);
        let (_, body) = status();
        assert!(body.contains("\"bus\":\"lost\""), "{body}");
        assert_eq!(
            get(admin, "/healthz", None).0,
            200,
            "the process still serves"
        );
    })
    .await
    .unwrap();

    nats.restart();
    tokio::task::spawn_blocking(move || {
        wait_until("/readyz 200 again", Duration::from_secs(15), || {
            status().0 == 200
        });
    })
    .await
    .unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_protects_everything_but_healthz() {
    let redis = RedisServer::start();
    let proxy = proxy(&redis, Some("s3cret")).await;
    let admin = proxy.admin_addr();
    tokio::task::spawn_blocking(move || {
        assert_eq!(get(admin, "/healthz", None).0, 200);
        for path in ["/readyz", "/metrics", "/stats"] {
            assert_eq!(get(admin, path, None).0, 401, "{path} without a token");
            assert_eq!(get(admin, path, Some("wrong")).0, 401, "{path} wrong token");
            assert_eq!(get(admin, path, Some("s3cret")).0, 200, "{path} with it");
        }
    })
    .await
    .unwrap();
    assert!(!proxy.log().contains("s3cret"), "the token is never logged");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_traffic() {
    let redis = RedisServer::start();
    let proxy = proxy(&redis, None).await;
    let admin = proxy.admin_addr();
    let scrape = move || async move {
        tokio::task::spawn_blocking(move || get(admin, "/metrics", None))
            .await
            .unwrap()
    };
    let (status, before) = scrape().await;
    assert_eq!(status, 200);
    promtool_check(&before);
    let b = samples(&before);
    let hits = "nearcache_l1_hits_total{rule=\"prefix:t:\"}";
    let misses = "nearcache_l1_misses_total{rule=\"prefix:t:\"}";
    let writes = "nearcache_commands_total{class=\"write\"}";
    assert_eq!((b[hits], b[misses]), (0.0, 0.0));

    let mut c = proxy.conn().await;
    set_then_get(&mut c, "t:a", "1", 3).await;

    let (_, after) = scrape().await;
    promtool_check(&after);
    check_histograms(&after);
    let a = samples(&after);
    assert_eq!(a[misses], 1.0, "the first GET missed");
    assert_eq!(a[hits], 2.0, "the next two hit L1");
    assert_eq!(a[writes] - b[writes], 1.0);
    assert_eq!(a["nearcache_clients_connected"], 1.0);
    assert_eq!(a["nearcache_upstream_up"], 1.0);
    assert!(a["nearcache_l1_entries"] >= 1.0);
    assert!(a["nearcache_reply_latency_seconds_count{path=\"l1_hit\"}"] >= 2.0);
    assert!(a["nearcache_process_resident_memory_bytes"] > 0.0);
    assert!(a["nearcache_process_open_fds"] > 0.0);
    assert!(a["nearcache_runtime_alive_tasks"] > 0.0);
    assert!(after.contains("nearcache_build_info{version=\""));
    drop(c);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_json_shows_what_proxy_stats_does() {
    let redis = RedisServer::start();
    let proxy = proxy(&redis, None).await;
    let admin = proxy.admin_addr();
    let mut c = proxy.conn().await;
    for _ in 0..2 {
        let _: Option<String> = redis::cmd("GET")
            .arg("t:b")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let (status, body) = tokio::task::spawn_blocking(move || get(admin, "/stats", None))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["upstream"], "up", "{body}");
    assert_eq!(v["requests"]["clients"], 1, "{body}");
    assert_eq!(v["requests"]["commands"]["read"], 2, "{body}");
    let rule = &v["cache"]["rules"][0];
    assert_eq!(rule["prefix"], "t:", "{body}");
    assert_eq!(rule["misses"], 2, "{body}");
    assert_eq!(v["ready"]["ready"], true, "{body}");
    drop(c);
    proxy.shutdown().await;
}
