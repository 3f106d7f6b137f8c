//! Key-prefix rules: which keys L1 may cache, and for how long.

use std::time::Duration;

use crate::config::RuleConfig;

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The prefix it governs.
    pub prefix: Box<[u8]>,
    /// Whether matching keys are cached at all.
    pub cache: bool,
    /// Longest L1 lifetime of a reply.
    pub ttl: Duration,
    /// Lifetime of a "key does not exist" reply; `None` = not cached.
    pub negative_ttl: Option<Duration>,
    /// Larger replies are not cached.
    pub max_value_size: usize,
    /// Expiry added to SETs of matching keys that carry none.
    pub upstream_ttl: Option<Duration>,
    /// Fraction of the TTL after which a hit refreshes the entry.
    pub refresh_ahead: Option<f64>,
}

/// All rules, longest prefix first, so the first match is the most specific.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// Compiles the configured rules.
    pub fn new(configs: &[RuleConfig]) -> Self {
        let mut rules: Vec<Rule> = configs
            .iter()
            .map(|c| Rule {
                prefix: c.prefix.as_bytes().into(),
                cache: c.cache,
                ttl: c.ttl.0,
                negative_ttl: c.negative_ttl.map(|d| d.0),
                max_value_size: c.max_value_size.as_usize(),
                upstream_ttl: c.upstream_ttl.map(|d| d.0),
                refresh_ahead: c.refresh_ahead,
            })
            .collect();
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Self { rules }
    }

    /// True when no rule caches anything or adds an upstream TTL (then L1
    /// can be skipped entirely).
    pub fn caches_nothing(&self) -> bool {
        !self
            .rules
            .iter()
            .any(|r| r.cache || r.upstream_ttl.is_some())
    }

    /// The rule for `key` and its index (for stats), if any rule matches.
    /// A linear scan: deployments have a handful of rules, and comparing a few
    /// short prefixes beats hashing.
    #[inline]
    pub fn lookup(&self, key: &[u8]) -> Option<(usize, &Rule)> {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| key.starts_with(&r.prefix))
    }

    /// The rules, in match order.
    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// True when there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ByteSize, Duration as Dur};

    fn rule(prefix: &str, cache: bool) -> RuleConfig {
        RuleConfig {
            prefix: prefix.into(),
            ttl: Dur(Duration::from_secs(1)),
            cache,
            negative_ttl: None,
            max_value_size: ByteSize(1024),
            upstream_ttl: None,
            refresh_ahead: None,
        }
    }

    #[test]
    fn longest_prefix_wins_whatever_the_order() {
        let rules = Rules::new(&[
            rule("", false),
            rule("ticker:", true),
            rule("ticker:private:", false),
        ]);
        let name = |k: &str| {
            rules
                .lookup(k.as_bytes())
                .map(|(_, r)| (String::from_utf8_lossy(&r.prefix).into_owned(), r.cache))
        };
        assert_eq!(name("ticker:BTC"), Some(("ticker:".into(), true)));
        assert_eq!(
            name("ticker:private:x"),
            Some(("ticker:private:".into(), false))
        );
        assert_eq!(name("other"), Some(("".into(), false)));
    }

    #[test]
    fn without_a_default_rule_unnamed_keys_match_nothing() {
        let rules = Rules::new(&[rule("ticker:", true)]);
        assert!(rules.lookup(b"candles:1m").is_none());
        assert!(!rules.caches_nothing());
        assert!(Rules::new(&[rule("x", false)]).caches_nothing());
    }
}
