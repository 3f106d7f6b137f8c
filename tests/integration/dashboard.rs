//! The dashboard at `/` of the admin listener, in headless Chromium over the
//! DevTools protocol: it loads from the admin listener and nothing else,
//! shows live, non-zero figures while traffic runs, logs no error, and the
//! token guards it. A screenshot is left in `target/dashboard.png`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

use nearcache::Config;
use nearcache::config::RuleConfig;
use serde_json::Value;

use crate::support::browser::Browser;
use crate::support::{NatsServer, RedisServer, TestProxy, config_for, http_get};

const TOKEN: &str = "dash-s3cret/+";
/// `TOKEN` as a query value.
const TOKEN_QUERY: &str = "dash-s3cret%2F%2B";

/// A proxy with the admin listener, a token, a cache rule for `t:`, the bus
/// (one instance) and a tight limit on PING, so every section has figures.
async fn proxy(redis: &RedisServer, nats: &NatsServer) -> TestProxy {
    let extra: Config = toml::from_str(
        r#"
        [[limits]]
        name = "pings"
        rate = "1/s"
        burst = 1
        commands = ["PING"]
        "#,
    )
    .unwrap();
    let mut cfg = config_for(redis);
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.admin.token = Some(TOKEN.into());
    cfg.cache.rules = vec![RuleConfig::caching("t:", Duration::from_secs(60))];
    cfg.coherence.nats_url = nats.url();
    cfg.limits = extra.limits;
    cfg.validate("test").unwrap();
    TestProxy::start_with(cfg).await
}

/// Until `stop`: a write, a miss and a hit of a fresh `t:` key, and a PING
/// (over the limit after the first), paced so the page sees a steady rate.
async fn traffic(proxy: &TestProxy, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let mut c = proxy.conn().await;
    tokio::spawn(async move {
        let mut rounds = 0;
        while !stop.load(SeqCst) {
            let key = format!("t:{rounds}");
            let _: () = redis::cmd("SET")
                .arg(&key)
                .arg("v")
                .query_async(&mut c)
                .await
                .unwrap();
            for _ in 0..2 {
                let v: String = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                assert_eq!(v, "v");
            }
            let _ = redis::cmd("PING").query_async::<String>(&mut c).await;
            rounds += 1;
            // Pacing, not synchronisation: a steady rate on a shared machine.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rounds
    })
}

/// The figures the page shows, read from its DOM.
const FIGURES: &str = r##"(() => {
  const t = (id) => document.getElementById(id).textContent;
  const n = (id) => parseFloat(t(id).replace(/[^0-9.]/g, "")) || 0;
  const rows = (id) => document.querySelectorAll("#" + id + " tbody tr").length;
  const d = window.nearcacheDashboard || {};
  return {
    polls: d.polls || 0,
    lastError: d.lastError || null,
    href: location.href,
    hitRatio: n("hit-ratio"),
    opsTotal: n("ops-total"),
    commands: n("commands-total"),
    l1Keys: n("l1-keys"),
    l1Bytes: n("l1-bytes"),
    peers: n("peers"),
    rejections: n("limit-rejections"),
    upstream: t("upstream-state"),
    bus: t("bus-state"),
    ready: t("ready-state"),
    rules: t("rules"),
    latency: t("latency"),
    limits: t("limits"),
    hotRows: rows("hot-keys"),
    bigRows: rows("big-keys"),
    bigKeys: t("big-keys"),
    charts: document.querySelectorAll(".uplot canvas").length,
  };
})()"##;

fn f(v: &Value, name: &str) -> f64 {
    v[name].as_f64().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_loads_from_the_admin_listener_alone_and_shows_live_figures() {
    let redis = RedisServer::start();
    let nats = NatsServer::start();
    let proxy = proxy(&redis, &nats).await;
    let admin: SocketAddr = proxy.admin_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = traffic(&proxy, stop.clone()).await;

    let (figures, browser) = tokio::task::spawn_blocking(move || {
        let mut b = Browser::start(1400, 1300);
        b.navigate(&format!("http://{admin}/?token={TOKEN_QUERY}"));
        // Rates need two polls with traffic between them; 20 s is ample on
        // a loaded machine for polls a second apart.
        let v = b.eval_until(
            "the page to show non-zero figures",
            Duration::from_secs(20),
            FIGURES,
            |v| {
                f(v, "polls") >= 2.0
                    && f(v, "hitRatio") > 0.0
                    && f(v, "opsTotal") > 0.0
                    && f(v, "commands") > 0.0
                    && f(v, "l1Keys") > 0.0
                    && f(v, "rejections") > 0.0
                    && f(v, "charts") >= 4.0
            },
        );
        // A few points on each chart, with traffic still running, so the
        // picture shows lines.
        b.eval_until("five polls", Duration::from_secs(20), FIGURES, |v| {
            f(v, "polls") >= 5.0
        });
        let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard.png");
        b.screenshot(&shot);
        assert!(
            std::fs::metadata(&shot).unwrap().len() > 10_000,
            "a real image"
        );
        // Read the events that arrived since the last reply.
        b.eval("1");
        (v, b)
    })
    .await
    .unwrap();
    stop.store(true, SeqCst);
    assert!(traffic.await.unwrap() > 0);

    assert_eq!(figures["lastError"], Value::Null, "{figures}");
    assert!(
        !figures["href"].as_str().unwrap().contains("token"),
        "the token leaves the address bar: {figures}"
    );
    assert_eq!(figures["upstream"], "upstream up", "{figures}");
    assert_eq!(figures["bus"], "bus connected", "{figures}");
    assert_eq!(figures["ready"], "ready", "{figures}");
    assert_eq!(f(&figures, "peers"), 1.0, "this instance alone: {figures}");
    assert!(
        figures["rules"].as_str().unwrap().contains("prefix t:"),
        "{figures}"
    );
    assert!(
        figures["latency"].as_str().unwrap().contains("l1_hit"),
        "{figures}"
    );
    assert!(
        figures["limits"].as_str().unwrap().contains("pings"),
        "{figures}"
    );
    // Every miss's fill is a big-key candidate, so the table names a `t:`
    // key; hot keys are sampled (one read in 8, flushed per 32 samples), so
    // that table may still say "none yet": a row either way.
    assert!(f(&figures, "hotRows") >= 1.0 && f(&figures, "bigRows") >= 1.0);
    assert!(
        figures["bigKeys"].as_str().unwrap().contains("t:"),
        "{figures}"
    );

    let origin = format!("http://{admin}/");
    let requests: Vec<String> = browser
        .events_of("Network.requestWillBeSent")
        .map(|p| p["request"]["url"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        requests.iter().any(|u| u.ends_with("/stats")),
        "the page polls /stats: {requests:?}"
    );
    let elsewhere: Vec<&String> = requests
        .iter()
        .filter(|u| !u.starts_with(&origin))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "requests off the admin listener: {elsewhere:?}"
    );

    let console: Vec<&Value> = browser
        .events_of("Runtime.consoleAPICalled")
        .filter(|p| p["type"] == "error")
        .collect();
    let thrown: Vec<&Value> = browser.events_of("Runtime.exceptionThrown").collect();
    let logged: Vec<&Value> = browser
        .events_of("Log.entryAdded")
        .filter(|p| p["entry"]["level"] == "error")
        .collect();
    assert!(
        console.is_empty() && thrown.is_empty() && logged.is_empty(),
        "errors in the page: console {console:?}, exceptions {thrown:?}, log {logged:?}"
    );
    drop(browser);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_wants_the_token_in_the_query_or_the_header() {
    let redis = RedisServer::start();
    let nats = NatsServer::start();
    let proxy = proxy(&redis, &nats).await;
    let admin = proxy.admin_addr();
    tokio::task::spawn_blocking(move || {
        let (status, body) = http_get(admin, "/", "");
        assert_eq!(status, 401, "no token: {body}");
        assert!(body.contains("/?token="), "says how: {body}");
        assert_eq!(http_get(admin, "/?token=wrong", "").0, 401, "a wrong token");
        assert_eq!(
            http_get(admin, "/?token=dash-s3cret", "").0,
            401,
            "a prefix of it"
        );
        let (status, page) = http_get(admin, &format!("/?token={TOKEN_QUERY}"), "");
        assert_eq!(status, 200);
        assert!(page.contains("<title>nearcache</title>"), "the page");
        let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
        assert_eq!(http_get(admin, "/", &bearer).0, 200, "the header works too");
        // The query is the page's alone: the API still wants the header.
        for path in ["/stats", "/metrics", "/readyz"] {
            let with_query = format!("{path}?token={TOKEN_QUERY}");
            assert_eq!(http_get(admin, &with_query, "").0, 401, "{with_query}");
        }
    })
    .await
    .unwrap();
    assert!(
        !proxy.log().contains("dash-s3cret"),
        "the token is never logged"
    );
    proxy.shutdown().await;
}
