//! `deploy/`: every metric the Grafana dashboard and the alert rules query
//! exists in a real scrape of nearcache after traffic (with a cache rule, the
//! bus and a limit, so every family has samples). A renamed metric fails
//! here, not silently on a dashboard.

use std::collections::BTreeSet;
use std::time::Duration;

use nearcache::Config;
use nearcache::config::RuleConfig;

use crate::support::{NatsServer, RedisServer, TestProxy, config_for, http_get};

/// `nearcache_…` names in `text` (a Grafana JSON or a rules file).
fn queried_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("nearcache_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_grafana_dashboard_and_alerts_query_is_exported() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let grafana = std::fs::read_to_string(root.join("grafana/nearcache.json")).unwrap();
    let alerts = std::fs::read_to_string(root.join("prometheus/alerts.yml")).unwrap();
    let mut wanted = queried_names(&grafana);
    wanted.extend(queried_names(&alerts));
    assert!(wanted.len() >= 15, "the exprs were read: {wanted:?}");

    let redis = RedisServer::start();
    let nats = NatsServer::start();
    let extra: Config = toml::from_str(
        "[[limits]]\nname = \"pings\"\nrate = \"1/s\"\nburst = 1\ncommands = [\"PING\"]\n",
    )
    .unwrap();
    let mut cfg = config_for(&redis);
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.cache.rules = vec![RuleConfig::caching("t:", Duration::from_secs(60))];
    cfg.coherence.nats_url = nats.url();
    cfg.limits = extra.limits;
    cfg.validate("test").unwrap();
    let proxy = TestProxy::start_with(cfg).await;
    let mut c = proxy.conn().await;
    let _: () = redis::cmd("SET")
        .arg("t:a")
        .arg("1")
        .query_async(&mut c)
        .await
        .unwrap();
    for _ in 0..2 {
        let _: String = redis::cmd("GET")
            .arg("t:a")
            .query_async(&mut c)
            .await
            .unwrap();
        let _ = redis::cmd("PING").query_async::<String>(&mut c).await;
    }
    let admin = proxy.admin_addr();
    let (status, scrape) = tokio::task::spawn_blocking(move || http_get(admin, "/metrics", ""))
        .await
        .unwrap();
    assert_eq!(status, 200);
    // Sample names (labels and values cut off), comments skipped.
    let exported: BTreeSet<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\n{scrape}"
    );
    drop(c);
    proxy.shutdown().await;
}
