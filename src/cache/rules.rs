//! Key rules: which keys L1 may cache, and for how long.
//!
//! A rule names its keys by prefix (`ticker:`) or by a Redis-style glob
//! (`candles:*:1m`). Pattern rules are tried first, in the order written;
//! then the longest matching prefix wins.

use std::sync::Arc;
use std::time::Duration;

use crate::config::RuleConfig;
use crate::glob;
use crate::stats::{RuleStats, Stats};

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The prefix it governs; for a pattern rule, the pattern's literal
    /// start (every key it matches begins with it).
    pub prefix: Box<[u8]>,
    /// The glob the whole key must match, for a pattern rule.
    pub pattern: Option<Box<[u8]>>,
    /// Whether matching keys are cached at all.
    pub cache: bool,
    /// Longest L1 lifetime of a reply.
    pub ttl: Duration,
    /// Keep of a "key does not exist" reply; `None` = not cached.
    pub negative_ttl: Option<Duration>,
    /// Larger replies are not cached.
    pub max_value_size: usize,
    /// Expiry added to SETs of matching keys that carry none.
    pub upstream_ttl: Option<Duration>,
    /// Fraction of the TTL after which a hit refreshes the entry.
    pub refresh_ahead: Option<f64>,
    /// How long past its TTL an entry may be served while Redis is
    /// unreachable; `None` = never.
    pub stale_if_error: Option<Duration>,
    /// Whether warming fills L1 with matching keys.
    pub warm: bool,
    /// Replies at least this large are held compressed in L1.
    pub compress_min_size: Option<usize>,
    /// String values at least `compress_min_size` are stored compressed in
    /// Redis (see [`crate::stored`]).
    pub store_compressed: bool,
    /// Its counters, kept in the registry by selector.
    pub stats: Arc<RuleStats>,
}

impl Rule {
    /// Whether the rule governs `key`.
    #[inline]
    pub fn matches(&self, key: &[u8]) -> bool {
        match &self.pattern {
            Some(p) => key.starts_with(&self.prefix) && glob::matches(p, key),
            None => key.starts_with(&self.prefix),
        }
    }

    /// How `PROXY STATS` names the rule: `("pattern", p)` or `("prefix", p)`.
    pub fn selector(&self) -> (&'static str, &[u8]) {
        match &self.pattern {
            Some(p) => ("pattern", p),
            None => ("prefix", &self.prefix),
        }
    }
}

/// All rules in match order: patterns as written, then prefixes longest
/// first, so the first match is the one that applies.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
    /// Some rule has Redis store values compressed (else the request path
    /// skips that phase with one test).
    store_compressed: bool,
}

impl Rules {
    /// Compiles the configured rules, each with its counters from `stats`.
    pub fn new(configs: &[RuleConfig], stats: &Stats) -> Self {
        let mut rules: Vec<Rule> = configs
            .iter()
            .map(|c| Rule {
                stats: {
                    let (kind, selector) = c.selector();
                    stats.rule(&format!("{kind}:{selector}"))
                },
                prefix: match &c.pattern {
                    Some(p) => glob::literal_prefix(p.as_bytes()).into(),
                    None => c.prefix.as_bytes().into(),
                },
                pattern: c.pattern.as_ref().map(|p| p.as_bytes().into()),
                cache: c.cache,
                ttl: c.ttl.0,
                negative_ttl: c.negative_ttl.map(|d| d.0),
                max_value_size: c.max_value_size.as_usize(),
                upstream_ttl: c.upstream_ttl.map(|d| d.0),
                refresh_ahead: c.refresh_ahead,
                stale_if_error: c.stale_if_error.map(|d| d.0),
                warm: c.warm && c.cache,
                compress_min_size: c.compress_min_size.map(|s| s.as_usize()),
                store_compressed: c.store_compressed,
            })
            .collect();
        // Stable: patterns keep their file order, ahead of every prefix.
        rules.sort_by_key(|r| match r.pattern {
            Some(_) => (false, 0),
            None => (true, usize::MAX - r.prefix.len()),
        });
        let store_compressed = rules.iter().any(crate::stored::stores_compressed);
        Self {
            rules,
            store_compressed,
        }
    }

    /// Whether some rule has Redis store values compressed.
    #[inline]
    pub fn any_store_compressed(&self) -> bool {
        self.store_compressed
    }

    /// True when no rule caches anything or adds an upstream TTL (then L1
    /// can be skipped entirely).
    pub fn caches_nothing(&self) -> bool {
        !self
            .rules
            .iter()
            .any(|r| r.cache || r.upstream_ttl.is_some())
    }

    /// The rule for `key`, if any rule matches. A linear scan: deployments
    /// have a handful of rules, and comparing a few short prefixes beats
    /// hashing.
    #[inline]
    pub fn lookup(&self, key: &[u8]) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(key))
    }

    /// The rule for `key` if one matches and caches.
    #[inline]
    pub fn caching(&self, key: &[u8]) -> Option<&Rule> {
        self.lookup(key).filter(|r| r.cache)
    }

    /// The expiry to add to a `SET` of `key` that carries none, if its rule
    /// asks for one.
    #[inline]
    pub fn upstream_ttl(&self, key: &[u8]) -> Option<Duration> {
        self.lookup(key).and_then(|r| r.upstream_ttl)
    }

    /// The prefixes Redis tracking must cover: those of rules that cache,
    /// without overlaps (Redis refuses `BCAST PREFIX a PREFIX ab`; `a` covers
    /// both). Sorted, so a prefix comes right before its extensions.
    pub fn cached_prefixes(&self) -> Vec<Vec<u8>> {
        let mut all: Vec<Vec<u8>> = self
            .rules
            .iter()
            .filter(|r| r.cache)
            .map(|r| r.prefix.to_vec())
            .collect();
        all.sort();
        let mut covering: Vec<Vec<u8>> = Vec::with_capacity(all.len());
        for p in all {
            if !covering.last().is_some_and(|c| p.starts_with(c)) {
                covering.push(p);
            }
        }
        covering
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
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::ByteSize;

    fn rule(prefix: &str, cache: bool) -> RuleConfig {
        RuleConfig {
            cache,
            max_value_size: ByteSize(1024),
            ..RuleConfig::caching(prefix, Duration::from_secs(1))
        }
    }

    impl Rules {
        fn new_for_test(configs: &[RuleConfig]) -> Self {
            Rules::new(configs, &Stats::default())
        }
    }

    #[test]
    fn tracking_prefixes_never_overlap() {
        let rule = |prefix: &str, pattern: Option<&str>, cache: bool| RuleConfig {
            pattern: pattern.map(Into::into),
            cache,
            ..RuleConfig::caching(prefix, Duration::from_secs(1))
        };
        let rules = Rules::new_for_test(&[
            rule("ticker:binance:", None, true),
            rule("ticker:", None, true),
            rule("orderbook:", None, true),
            rule("", Some("candles:*:1m"), true),
            rule("candles:", None, true),
            rule("private:", None, false),
        ]);
        // Redis refuses BCAST prefixes where one starts another.
        assert_eq!(
            rules.cached_prefixes(),
            vec![
                b"candles:".to_vec(),
                b"orderbook:".to_vec(),
                b"ticker:".to_vec()
            ]
        );
    }

    #[test]
    fn a_rule_keeps_its_counters_across_a_recompile() {
        let stats = Stats::default();
        let configs = [rule("ticker:", true), pattern("candles:*", true)];
        let first = Rules::new(&configs, &stats);
        let again = Rules::new(&configs[..1], &stats);
        let ticker = |r: &Rules| r.lookup(b"ticker:x").map(|r| r.stats.clone());
        assert!(Arc::ptr_eq(
            &ticker(&first).unwrap(),
            &ticker(&again).unwrap()
        ));
        let candles = first.lookup(b"candles:1").unwrap();
        assert!(!Arc::ptr_eq(&candles.stats, &ticker(&first).unwrap()));
    }

    #[test]
    fn longest_prefix_wins_whatever_the_order() {
        let rules = Rules::new_for_test(&[
            rule("", false),
            rule("ticker:", true),
            rule("ticker:private:", false),
        ]);
        let name = |k: &str| {
            rules
                .lookup(k.as_bytes())
                .map(|r| (String::from_utf8_lossy(&r.prefix).into_owned(), r.cache))
        };
        assert_eq!(name("ticker:BTC"), Some(("ticker:".into(), true)));
        assert_eq!(
            name("ticker:private:x"),
            Some(("ticker:private:".into(), false))
        );
        assert_eq!(name("other"), Some(("".into(), false)));
    }

    fn pattern(glob: &str, cache: bool) -> RuleConfig {
        RuleConfig {
            pattern: Some(glob.into()),
            ..rule("", cache)
        }
    }

    #[test]
    fn patterns_come_first_in_file_order_then_the_longest_prefix() {
        let rules = Rules::new_for_test(&[
            rule("candles:", true),
            pattern("candles:*:1m", false),
            pattern("candles:BTC:*", true),
            rule("candles:BTC:", false),
        ]);
        let which = |k: &str| {
            rules.lookup(k.as_bytes()).map(|r| {
                let (kind, sel) = r.selector();
                format!("{kind} {}", String::from_utf8_lossy(sel))
            })
        };
        // Both patterns match: the one written first wins.
        assert_eq!(
            which("candles:BTC:1m").as_deref(),
            Some("pattern candles:*:1m")
        );
        // Only the second pattern matches; it beats the longer prefix.
        assert_eq!(
            which("candles:BTC:1h").as_deref(),
            Some("pattern candles:BTC:*")
        );
        assert_eq!(which("candles:ETH:1h").as_deref(), Some("prefix candles:"));
        assert_eq!(which("ticker:BTC"), None);
        // A pattern matches the whole key, not a prefix of it.
        assert_eq!(which("candles:ETH:1mx").as_deref(), Some("prefix candles:"));
    }

    #[test]
    fn a_pattern_rule_keeps_its_literal_start_as_prefix() {
        let rules = Rules::new_for_test(&[pattern("candles:*:1m", true)]);
        let r = rules.iter().next().unwrap();
        assert_eq!(&r.prefix[..], b"candles:");
        assert!(r.matches(b"candles:BTC:1m"));
        assert!(!r.matches(b"ticker:x:1m"));
    }

    #[test]
    fn without_a_default_rule_unnamed_keys_match_nothing() {
        let rules = Rules::new_for_test(&[rule("ticker:", true)]);
        assert!(rules.lookup(b"candles:1m").is_none());
        assert!(!rules.caches_nothing());
        assert!(Rules::new_for_test(&[rule("x", false)]).caches_nothing());
    }
}
