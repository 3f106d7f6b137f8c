//! `PROXY CONFIG GET <field|glob> …`: the configuration in force by dotted
//! field name (`upstream.url`, `cache.max_memory`, `cache.rules[0].ttl`),
//! with secrets masked: fields named like a password, token or secret, and
//! the credentials inside URLs. Fields left unset (`server.password` when
//! there is none) are not listed, as the TOML would not have them.

use crate::config::Config;
use crate::glob;
use crate::protocol::reply::Reply;

/// What a masked secret reads as.
const MASK: &str = "***";

/// Every field of `cfg` as (dotted name, value as text), secrets masked, in
/// file order.
pub fn fields(cfg: &Config) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Ok(value) = toml::Value::try_from(cfg) {
        flatten("", &value, &mut out);
    }
    out
}

fn flatten(path: &str, value: &toml::Value, out: &mut Vec<(String, String)>) {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table {
                flatten(&join(key), v, out);
            }
        }
        // Arrays of tables (`cache.rules`, `limits`) by index; arrays of
        // values as TOML writes them.
        toml::Value::Array(items) if items.iter().all(|v| v.is_table()) && !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{path}[{i}]"), v, out);
            }
        }
        toml::Value::String(s) => out.push((path.to_owned(), masked(path, s))),
        other => out.push((path.to_owned(), other.to_string())),
    }
}

/// `value` of the field at `path`, masked if it is a secret.
fn masked(path: &str, value: &str) -> String {
    let name = path.rsplit('.').next().unwrap_or(path);
    if crate::config::is_secret_field(name) && !value.is_empty() {
        return MASK.to_owned();
    }
    if value.contains("://") {
        return mask_url(value);
    }
    value.to_owned()
}

/// A URL with the password in its user info masked
/// (`redis://user:***@host:6379/0`, `redis://***@host`); anything else
/// unchanged.
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    // (The user info ends at the last '@' before the path.)
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let user = match rest[..at].split_once(':') {
        Some((user, _)) => format!("{user}:{MASK}"),
        // `redis://password@host`: Redis URLs take a lone password.
        None => MASK.to_owned(),
    };
    format!("{}{user}{}", &url[..scheme_end], &rest[at..])
}

/// `PROXY CONFIG GET pattern …`: every field matching one of `patterns`
/// (exact names or Redis-style globs), as `CONFIG GET` answers: a map in
/// RESP3, a flat name/value array in RESP2.
pub fn config_get(r: &mut Reply, cfg: &Config, patterns: &[bytes::Bytes]) {
    // (Field names are lower case; CONFIG GET's patterns are not case
    // sensitive.)
    let patterns: Vec<Vec<u8>> = patterns.iter().map(|p| p.to_ascii_lowercase()).collect();
    let found: Vec<(String, String)> = fields(cfg)
        .into_iter()
        .filter(|(name, _)| {
            patterns
                .iter()
                .any(|p| p == name.as_bytes() || glob::matches(p, name.as_bytes()))
        })
        .collect();
    r.map(found.len());
    for (name, value) in found {
        r.bulk(name.as_bytes()).bulk(value.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_lose_their_passwords_only() {
        assert_eq!(
            mask_url("redis://app:s3cret@10.0.0.1:6379/2"),
            "redis://app:***@10.0.0.1:6379/2"
        );
        assert_eq!(mask_url("redis://s3cret@h"), "redis://***@h");
        assert_eq!(mask_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(mask_url("nats://u:p@n:4222"), "nats://u:***@n:4222");
        assert_eq!(mask_url("not a url"), "not a url");
    }

    #[test]
    fn fields_are_dotted_and_secrets_masked() {
        let mut cfg = Config::default();
        cfg.upstream.url = "redis://default:hunter2@127.0.0.1:6379".into();
        cfg.server.password = Some("clientpw".into());
        cfg.admin.token = Some("tok".into());
        cfg.coherence.password = "natspw".into();
        cfg.cache.rules = vec![crate::config::RuleConfig::caching(
            "t:",
            std::time::Duration::from_secs(2),
        )];
        let all: std::collections::HashMap<String, String> = fields(&cfg).into_iter().collect();
        assert_eq!(all["upstream.url"], "redis://default:***@127.0.0.1:6379");
        assert_eq!(all["server.password"], MASK);
        assert_eq!(all["admin.token"], MASK);
        assert_eq!(all["coherence.password"], MASK);
        assert_eq!(all["coherence.token"], "", "empty: nothing to hide");
        assert_eq!(all["cache.rules[0].prefix"], "t:");
        assert_eq!(all["cache.rules[0].ttl"], "2s");
        assert_eq!(all["admin.slowlog_threshold"], "10ms");
        let text = format!("{all:?}");
        for secret in ["hunter2", "clientpw", "natspw", "\"tok\""] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }
}
