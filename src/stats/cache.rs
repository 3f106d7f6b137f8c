//! Per-rule cache counters, lock-free, read by `PROXY STATS`. A rule's
//! counters are found by its selector in the registry, so a rule that stays
//! the same across a reload keeps them.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Counters for one rule.
#[derive(Debug, Default)]
pub struct RuleStats {
    /// Reads answered from L1.
    pub hits: AtomicU64,
    /// Cacheable reads that went upstream.
    pub misses: AtomicU64,
    /// Replies stored in L1.
    pub fills: AtomicU64,
    /// Fills discarded because the key was invalidated while they were in flight.
    pub stale_fills_rejected: AtomicU64,
    /// Entries evicted for space.
    pub evictions: AtomicU64,
    /// Keys dropped because they were written.
    pub invalidations: AtomicU64,
    /// Bytes currently held (entry weights).
    pub bytes: AtomicI64,
    /// Keys currently held.
    pub entries: AtomicI64,
}

impl RuleStats {
    /// Adds one to a counter.
    #[inline]
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// A consistent-enough snapshot: (name, value) pairs.
    pub fn snapshot(&self) -> [(&'static str, i64); 8] {
        let g = |c: &AtomicU64| i64::try_from(c.load(Relaxed)).unwrap_or(i64::MAX);
        [
            ("hits", g(&self.hits)),
            ("misses", g(&self.misses)),
            ("fills", g(&self.fills)),
            ("stale_fills_rejected", g(&self.stale_fills_rejected)),
            ("evictions", g(&self.evictions)),
            ("invalidations", g(&self.invalidations)),
            ("bytes", self.bytes.load(Relaxed)),
            ("entries", self.entries.load(Relaxed)),
        ]
    }
}
