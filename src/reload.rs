//! Hot reload: `SIGHUP` and `PROXY RELOAD` read the configuration file
//! again (with the same environment and flags over it), validate it whole,
//! and swap what can change at run time — the key rules, `server.password`,
//! the upstream's password — in one step behind [`Context::snapshot`];
//! no client connection is dropped. The client TLS certificate and key
//! (`[server.tls]`) are read again and swapped too, so certificates rotate:
//! connections keep the session they made, new ones get the new certificate. A file that does not validate changes
//! nothing, and the error names the file and the field, as `check-config`
//! does. A field that only a restart can apply is reported, not ignored.
//!
//! L1 entries whose rule changed or vanished (and those a new rule takes
//! over) are dropped, so no reply outlives the rule it was cached under.

use std::path::PathBuf;
use std::sync::Arc;

use crate::cache::{Rule, Rules};
use crate::config::{Config, ConfigError, Overrides};
use crate::context::{Context, Snapshot};
use crate::limits::Limits;

/// Where the running configuration came from.
#[derive(Debug, Clone)]
pub struct Source {
    /// The file.
    pub path: PathBuf,
    /// The environment and flags applied over it.
    pub overrides: Overrides,
}

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Rules added, changed or removed.
    pub rules_changed: usize,
    /// Limits added, changed or removed.
    pub limits_changed: usize,
    /// Fields that changed but take a restart to apply.
    pub restart_needed: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The proxy did not start from a file.
    #[error("no configuration file to reload (nearcache started without --config)")]
    NoFile,
    /// The file does not parse or validate.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Reads the configuration again and swaps what can change now; logs what
/// it did, or why it did nothing, as `why` (`SIGHUP`, `PROXY RELOAD`).
pub async fn reload(ctx: &Context, why: &str) -> Result<Reloaded, ReloadError> {
    let outcome = apply(ctx).await;
    match &outcome {
        Ok(done) if done.restart_needed.is_empty() => {
            tracing::info!(
                rules_changed = done.rules_changed,
                "{why}: configuration reloaded"
            );
        }
        Ok(done) => tracing::warn!(
            rules_changed = done.rules_changed,
            limits_changed = done.limits_changed,
            restart_needed = %done.restart_needed.join(", "),
            "{why}: configuration reloaded; these changes take a restart"
        ),
        Err(e @ ReloadError::NoFile) => tracing::warn!("{why} ignored: {e}"),
        Err(e) => tracing::error!("{why}: configuration not reloaded: {}", e.one_line()),
    }
    outcome
}

impl ReloadError {
    /// The message on one line (a TOML error spans several), for a log
    /// line or an error reply.
    pub fn one_line(&self) -> String {
        self.to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }
}

async fn apply(ctx: &Context) -> Result<Reloaded, ReloadError> {
    let source = ctx.source.as_ref().ok_or(ReloadError::NoFile)?;
    let _one_at_a_time = ctx.reloading.lock().await;
    let mut next = Config::from_file(&source.path)?;
    next.apply(source.overrides.clone());
    next.validate(&source.path.display().to_string())?;
    let url = next.upstream_url()?;

    let mut report = Reloaded {
        restart_needed: restart_needed(&ctx.cfg, &next),
        ..Reloaded::default()
    };
    let current = ctx.snapshot.load_full();
    let rules = Rules::new(&next.cache.rules, &ctx.stats);
    let changed = changed_rules(&current.rules, &rules);
    report.rules_changed = changed.len();
    if ctx.l1.is_none() && !rules.caches_nothing() {
        report
            .restart_needed
            .push("cache.rules (no rule cached at start, so there is no L1)".into());
    }
    if ctx.cfg.coherence.redis_tracking
        && rules.cached_prefixes() != current.rules.cached_prefixes()
    {
        report
            .restart_needed
            .push("cache.rules (the prefixes Redis tracking watches)".into());
    }
    // Built before anything is swapped: a broken certificate changes nothing
    // (validate read the files too; this is the configuration to install).
    let server_tls = match (&ctx.tls, &next.server.tls) {
        (Some(_), Some(t)) => {
            Some(
                crate::tls::server_config(t).map_err(|e| ConfigError::Invalid {
                    origin: source.path.display().to_string(),
                    errors: vec![crate::config::FieldError {
                        field: e.field().into(),
                        message: e.detail(),
                    }],
                })?,
            )
        }
        _ => None,
    };
    if url.username == ctx.upstream.url().username {
        ctx.upstream.set_password(url.password);
    }
    if let (Some(tls), Some(config)) = (&ctx.tls, server_tls) {
        tls.config.store(config);
    }
    let limits = Limits::new(
        &next.limits,
        &ctx.stats,
        Some(&current.limits),
        ctx.live_instances(),
    );
    report.limits_changed = next
        .limits
        .iter()
        .filter(|l| !ctx_has(&current.limits, l))
        .count()
        + current
            .limits
            .iter()
            .filter(|l| !next.limits.contains(l.config()))
            .count();
    let (users, fence) = Snapshot::access(&next);
    ctx.snapshot.store(Arc::new(Snapshot {
        rules,
        password: next.server.password.clone(),
        limits,
        users,
        fence,
    }));
    // After the swap: no new fill can take an old rule's ttl any more.
    if let Some(l1) = &ctx.l1 {
        for glob in changed {
            l1.invalidate_matching(&glob);
        }
    }
    Ok(report)
}

/// Whether `limits` has one configured as `cfg`.
fn ctx_has(limits: &Limits, cfg: &crate::config::LimitConfig) -> bool {
    limits.iter().any(|l| l.config() == cfg)
}

/// The globs of keys whose rule is not the same any more: rules removed or
/// changed, and rules new (they may take keys over from another).
fn changed_rules(old: &Rules, new: &Rules) -> Vec<Vec<u8>> {
    let same = |a: &Rule, b: &Rule| {
        a.selector() == b.selector()
            && (
                a.cache,
                a.ttl,
                a.negative_ttl,
                a.max_value_size,
                a.upstream_ttl,
            ) == (
                b.cache,
                b.ttl,
                b.negative_ttl,
                b.max_value_size,
                b.upstream_ttl,
            )
            && a.refresh_ahead == b.refresh_ahead
    };
    let gone = old.iter().filter(|a| !new.iter().any(|b| same(a, b)));
    let added = new.iter().filter(|b| !old.iter().any(|a| same(a, b)));
    let mut globs: Vec<Vec<u8>> = gone.chain(added).map(glob_of).collect();
    globs.sort();
    globs.dedup();
    globs
}

/// The glob of a rule's keys: its pattern, or its prefix followed by `*`.
fn glob_of(rule: &Rule) -> Vec<u8> {
    if let Some(p) = &rule.pattern {
        return p.to_vec();
    }
    let mut glob = Vec::with_capacity(rule.prefix.len() + 2);
    for &b in rule.prefix.iter() {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            glob.push(b'\\');
        }
        glob.push(b);
    }
    glob.push(b'*');
    glob
}

/// The fields of `next` that differ from `running` but only a restart
/// applies: everything but the rules, `server.password` and the upstream's
/// password.
fn restart_needed(running: &Config, next: &Config) -> Vec<String> {
    let mut a = running.clone();
    let mut b = next.clone();
    // What a reload applies is left out of the comparison.
    b.server.password.clone_from(&a.server.password);
    // Client TLS files are read again on every reload (rotation); where
    // TLS is on and stays on, new paths and client authentication apply too.
    if let (Some(ta), Some(tb)) = (&a.server.tls, &mut b.server.tls) {
        tb.cert_file.clone_from(&ta.cert_file);
        tb.key_file.clone_from(&ta.key_file);
        tb.client_ca_file.clone_from(&ta.client_ca_file);
        tb.client_auth = ta.client_auth;
    }
    b.limits.clone_from(&a.limits);
    b.users.clone_from(&a.users);
    b.server.deny.clone_from(&a.server.deny);
    b.server.rename.clone_from(&a.server.rename);
    if let (Ok(ua), Ok(ub)) = (a.upstream_url(), b.upstream_url()) {
        // A new password applies; a new user (whose L1 and CLIENT LIST
        // name are set at start), address or scheme (TLS or not) takes a
        // restart.
        let address = |u: &crate::config::RedisUrl| {
            (u.host.clone(), u.port, u.db, u.username.clone(), u.secure)
        };
        if address(&ua) == address(&ub) {
            b.upstream.url.clone_from(&a.upstream.url);
        }
    }
    a.cache.rules.clear();
    b.cache.rules.clear();
    let (Ok(ta), Ok(tb)) = (toml::Value::try_from(&a), toml::Value::try_from(&b)) else {
        return vec!["(the configuration could not be compared)".into()];
    };
    let mut fields = Vec::new();
    diff("", &ta, &tb, &mut fields);
    fields
}

/// The dotted paths at which `a` and `b` differ.
fn diff(path: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
    match (a, b) {
        (toml::Value::Table(ta), toml::Value::Table(tb)) => {
            let mut keys: Vec<&String> = ta.keys().chain(tb.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let sub = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (ta.get(key), tb.get(key)) {
                    (Some(x), Some(y)) => diff(&sub, x, y, out),
                    _ => out.push(sub),
                }
            }
        }
        _ if a != b => out.push(path.to_owned()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuleConfig;
    use crate::stats::Stats;
    use std::time::Duration;

    #[test]
    fn only_what_a_restart_applies_is_reported() {
        let running = Config::default();
        let mut next = running.clone();
        next.cache.rules = vec![RuleConfig::caching("t:", Duration::from_secs(1))];
        next.server.password = Some("new".into());
        next.upstream.url = "redis://:rotated@127.0.0.1:6379".into();
        assert_eq!(restart_needed(&running, &next), Vec::<String>::new());
        next.upstream.url = "redis://someone:rotated@127.0.0.1:6379".into();
        assert_eq!(restart_needed(&running, &next), vec!["upstream.url"]);
        next.server.listen = "127.0.0.1:7000".into();
        next.upstream.url = "redis://127.0.0.1:6390".into();
        next.upstream.pool_size = 4;
        assert_eq!(
            restart_needed(&running, &next),
            vec!["server.listen", "upstream.pool_size", "upstream.url"]
        );
    }

    #[test]
    fn changed_rules_name_the_keys_to_drop() {
        let stats = Stats::default();
        let old = Rules::new(
            &[
                RuleConfig::caching("ticker:", Duration::from_secs(2)),
                RuleConfig::caching("candles:", Duration::from_secs(60)),
                RuleConfig::caching("a*b", Duration::from_secs(1)),
            ],
            &stats,
        );
        let new = Rules::new(
            &[
                RuleConfig::caching("ticker:", Duration::from_secs(2)),
                RuleConfig::caching("candles:", Duration::from_secs(30)),
                RuleConfig::caching("book:", Duration::from_secs(1)),
            ],
            &stats,
        );
        assert_eq!(
            changed_rules(&old, &new),
            vec![
                b"a\\*b*".to_vec(),
                b"book:*".to_vec(),
                b"candles:*".to_vec()
            ]
        );
        assert!(changed_rules(&old, &old).is_empty());
    }
}
