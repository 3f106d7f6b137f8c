//! A lock-free log-linear histogram for latency figures (µs).
//!
//! Recording is one relaxed `fetch_add` on a bucket, so it may sit on a busy
//! path; quantiles are read by scanning ~500 buckets, which only `PROXY
//! STATS` does. Values below 16 are exact; above, each power of two is split
//! into 8 buckets, so a reported quantile (the bucket's upper bound) is at
//! most 12.5 % above the true value and never below it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Exact buckets for 0..EXACT.
const EXACT: u64 = 16;
/// Buckets per power of two above `EXACT` (a power of two).
const SUB: u64 = 8;
const SUB_BITS: u32 = SUB.trailing_zeros();
/// log2(EXACT): the first octave that is split.
const FIRST_OCTAVE: u32 = EXACT.trailing_zeros();
const BUCKETS: usize = (EXACT + (64 - FIRST_OCTAVE as u64) * SUB) as usize;

/// Counts of values by magnitude, plus count, sum and max.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < EXACT {
        return v as usize;
    }
    let octave = 63 - v.leading_zeros();
    let sub = (v >> (octave - SUB_BITS)) & (SUB - 1);
    (EXACT + u64::from(octave - FIRST_OCTAVE) * SUB + sub) as usize
}

/// The largest value that falls in bucket `b`.
fn upper_bound(b: usize) -> u64 {
    let b = b as u64;
    if b < EXACT {
        return b;
    }
    let octave = (b - EXACT) / SUB + u64::from(FIRST_OCTAVE);
    let sub = (b - EXACT) % SUB;
    let width_bits = octave as u32 - SUB_BITS;
    // (SUB + sub + 1) << width_bits, minus one, without overflowing at the top.
    ((SUB + sub) << width_bits).saturating_add((1u64 << width_bits) - 1)
}

impl Histogram {
    /// Records one value.
    pub fn record(&self, v: u64) {
        self.record_n(v, 1);
    }

    /// Records `n` samples of the same value (the replies of a pipelined run
    /// that arrived together).
    pub fn record_n(&self, v: u64, n: u64) {
        if n == 0 {
            return;
        }
        self.buckets[bucket_of(v)].fetch_add(n, Relaxed);
        self.count.fetch_add(n, Relaxed);
        self.sum.fetch_add(v.saturating_mul(n), Relaxed);
        self.max.fetch_max(v, Relaxed);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Mean of the values recorded (0 if none).
    pub fn mean(&self) -> u64 {
        self.sum
            .load(Relaxed)
            .checked_div(self.count())
            .unwrap_or(0)
    }

    /// Largest value recorded (0 if none).
    pub fn max(&self) -> u64 {
        self.max.load(Relaxed)
    }

    /// Sum of the values recorded.
    pub fn sum(&self) -> u64 {
        self.sum.load(Relaxed)
    }

    /// Counts per bucket as (largest value in the bucket, count), the empty
    /// ones left out: for an exporter that re-buckets at scrape time.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.buckets
            .iter()
            .enumerate()
            .map(|(b, n)| (upper_bound(b), n.load(Relaxed)))
            .filter(|&(_, n)| n != 0)
    }

    /// The value at quantile `q` (0.0–1.0), as its bucket's upper bound capped
    /// by the maximum; 0 if nothing was recorded.
    pub fn quantile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return upper_bound(b).min(self.max());
            }
        }
        self.max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_u64() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(upper_bound(BUCKETS - 1), u64::MAX);
        for b in 0..BUCKETS - 1 {
            let hi = upper_bound(b);
            assert_eq!(bucket_of(hi), b, "upper bound of {b}");
            assert_eq!(bucket_of(hi + 1), b + 1, "first value after bucket {b}");
        }
    }

    #[test]
    fn quantiles_are_within_an_eighth_above() {
        let h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        assert_eq!(h.count(), 10_000);
        assert_eq!(h.mean(), 5_000);
        assert_eq!(h.max(), 10_000);
        for (q, exact) in [(0.5, 5_000u64), (0.99, 9_900), (0.001, 10)] {
            let got = h.quantile(q);
            assert!(
                got >= exact && got as f64 <= exact as f64 * 1.125,
                "q{q}: {got} vs {exact}"
            );
        }
        assert_eq!(h.quantile(1.0), 10_000);
    }

    #[test]
    fn empty_reads_zero() {
        let h = Histogram::default();
        assert_eq!(
            (h.count(), h.mean(), h.max(), h.quantile(0.99)),
            (0, 0, 0, 0)
        );
    }
}
