//! Per-rule cache counters, lock-free, read by `PROXY STATS`. A rule's
//! counters are found by its selector in the registry, so a rule that stays
//! the same across a reload keeps them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Largest replies kept per rule (`PROXY BIGKEYS`).
pub const BIG_KEYS_PER_RULE: usize = 16;

/// Counters for one rule.
#[derive(Debug, Default)]
pub struct RuleStats {
    /// Reads answered from L1.
    pub hits: AtomicU64,
    /// Cacheable reads that went upstream.
    pub misses: AtomicU64,
    /// Replies stored in L1.
    pub fills: AtomicU64,
    /// Reads answered from L1 past their TTL because Redis was unreachable
    /// (the rule's `stale_if_error`).
    pub stale_hits: AtomicU64,
    /// Fills discarded because the key was invalidated while they were in flight.
    pub stale_fills_rejected: AtomicU64,
    /// Entries evicted for space.
    pub evictions: AtomicU64,
    /// Keys dropped because they were written.
    pub invalidations: AtomicU64,
    /// Bytes currently held (entry weights).
    pub bytes: AtomicI64,
    /// Keys currently held (entries; updated with `bytes`).
    pub entries: AtomicI64,
    /// Bytes compression saves on the entries currently held (their
    /// uncompressed size is `bytes` plus this).
    pub compression_saved: AtomicI64,
    /// The largest replies filled under the rule.
    pub big_keys: BigKeys,
}

/// The largest replies seen under one rule: at most
/// [`BIG_KEYS_PER_RULE`] keys, each with the largest reply it had.
///
/// Fed by L1 fills, which already take locks; once the list is full, a
/// reply no larger than its smallest is turned away by one relaxed load
/// (`floor`), so only a new contender takes the lock.
#[derive(Debug, Default)]
pub struct BigKeys {
    /// The smallest size in the list once it is full (0 until then).
    floor: AtomicU64,
    list: Mutex<Vec<BigKey>>,
}

/// A key and the largest reply seen for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BigKey {
    /// Its database.
    pub db: u32,
    /// The key.
    pub key: Box<[u8]>,
    /// The reply's size in bytes (as RESP).
    pub bytes: u64,
}

impl BigKeys {
    /// A reply of `bytes` for `key` in `db`.
    #[inline]
    pub fn offer(&self, db: u32, key: &[u8], bytes: u64) {
        if bytes <= self.floor.load(Relaxed) {
            return;
        }
        self.contend(db, key, bytes);
    }

    #[cold]
    fn contend(&self, db: u32, key: &[u8], bytes: u64) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = list.iter_mut().find(|k| k.db == db && &*k.key == key) {
            k.bytes = k.bytes.max(bytes);
        } else if list.len() < BIG_KEYS_PER_RULE {
            list.push(BigKey {
                db,
                key: key.into(),
                bytes,
            });
        } else if let Some(smallest) = list.iter_mut().min_by_key(|k| k.bytes) {
            if bytes > smallest.bytes {
                *smallest = BigKey {
                    db,
                    key: key.into(),
                    bytes,
                };
            }
        }
        if list.len() == BIG_KEYS_PER_RULE {
            let floor = list.iter().map(|k| k.bytes).min().unwrap_or(0);
            self.floor.store(floor, Relaxed);
        }
    }

    /// The keys, largest first.
    pub fn largest(&self) -> Vec<BigKey> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner()).clone();
        list.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.key.cmp(&b.key)));
        list
    }
}

impl RuleStats {
    /// Adds one to a counter.
    #[inline]
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// A consistent-enough snapshot: (name, value) pairs.
    pub fn snapshot(&self) -> [(&'static str, i64); 10] {
        let g = |c: &AtomicU64| i64::try_from(c.load(Relaxed)).unwrap_or(i64::MAX);
        [
            ("hits", g(&self.hits)),
            ("misses", g(&self.misses)),
            ("fills", g(&self.fills)),
            ("stale_hits", g(&self.stale_hits)),
            ("stale_fills_rejected", g(&self.stale_fills_rejected)),
            ("evictions", g(&self.evictions)),
            ("invalidations", g(&self.invalidations)),
            ("bytes", self.bytes.load(Relaxed)),
            ("entries", self.entries.load(Relaxed)),
            (
                "compression_saved_bytes",
                self.compression_saved.load(Relaxed),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_keys_keep_the_largest_per_key_within_the_bound() {
        let big = BigKeys::default();
        for i in 0..100u64 {
            big.offer(0, format!("k{i}").as_bytes(), i);
        }
        // A key seen again keeps its largest size.
        big.offer(0, b"k99", 5);
        big.offer(3, b"k99", 1000);
        let list = big.largest();
        assert_eq!(list.len(), BIG_KEYS_PER_RULE);
        assert_eq!((list[0].db, list[0].bytes), (3, 1000));
        assert_eq!((&*list[1].key, list[1].bytes), (&b"k99"[..], 99));
        assert_eq!(list.last().map(|k| k.bytes), Some(85));
    }
}
