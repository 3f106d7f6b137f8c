//! The most-read keys (`PROXY HOTKEYS`, `/stats` `hot_keys`), in bounded
//! memory and at a negligible cost to the read path.
//!
//! Design:
//! - **Sampling, per session.** Every cacheable read (an L1 hit or miss)
//!   bumps a plain integer in the session's [`HotKeySampler`]; one read in
//!   [`SAMPLE_EVERY`] copies its key into the sampler's reused buffer (no
//!   allocation once the buffer has grown). The read path takes no lock and
//!   touches no shared memory for this.
//! - **Batched flush.** Once [`BATCH`] samples are buffered (and when the
//!   session ends), the sampler takes the one lock of [`HotKeys`] and adds
//!   them all: one lock per `SAMPLE_EVERY × BATCH` reads.
//! - **Space-Saving top-K** (Metwally, Agrawal, El Abbadi 2005) behind that
//!   lock: [`CAPACITY`] counters; a key not counted takes over the smallest
//!   counter (count + 1, remembering that count as its possible error).
//!   Chosen over HeavyKeeper or a count-min sketch with a heap because it is
//!   deterministic (no hash collisions to reason about), exact while fewer
//!   than `CAPACITY` keys are read, and its guarantee is simple: every key
//!   read more than `samples / CAPACITY` times is in the table, and no count
//!   is over by more than its `error`.
//!
//! Counts are estimates of reads: samples × `SAMPLE_EVERY`, since the
//! process started. Keys are counted by (database, key) whatever the
//! protocol or user that read them.

use std::collections::HashMap;
use std::sync::Mutex;

/// One read in this many is sampled.
pub const SAMPLE_EVERY: u32 = 8;
/// Samples a session buffers before it adds them to [`HotKeys`].
pub const BATCH: usize = 32;
/// Counters kept (keys tracked at once).
pub const CAPACITY: usize = 256;
/// Longest key prefix sampled: longer keys are counted by their first
/// `MAX_KEY` bytes, so one huge key cannot grow a session's buffer.
const MAX_KEY: usize = 512;

/// A key and its estimated reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotKey {
    /// The database it was read in.
    pub db: u32,
    /// The key (at most its first 512 bytes).
    pub key: Vec<u8>,
    /// Estimated reads (samples × [`SAMPLE_EVERY`]).
    pub count: u64,
    /// By how many reads `count` may overstate it.
    pub error: u64,
}

#[derive(Debug)]
struct Counter {
    /// The database (4 bytes, big-endian), then the key.
    id: Box<[u8]>,
    count: u64,
    error: u64,
}

/// The shared top-K table (see the module's doc).
#[derive(Debug, Default)]
pub struct HotKeys {
    inner: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    counters: Vec<Counter>,
    /// Id → index in `counters`.
    index: HashMap<Box<[u8]>, usize>,
}

impl Table {
    /// One sample of `id` (a database and key, as [`Counter::id`]).
    fn add(&mut self, id: &[u8]) {
        if let Some(&i) = self.index.get(id) {
            self.counters[i].count += 1;
            return;
        }
        if self.counters.len() < CAPACITY {
            self.index.insert(id.into(), self.counters.len());
            self.counters.push(Counter {
                id: id.into(),
                count: 1,
                error: 0,
            });
            return;
        }
        // Space-Saving: the smallest counter is taken over.
        let Some((i, _)) = self
            .counters
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.count)
        else {
            return;
        };
        let c = &mut self.counters[i];
        self.index.remove(&c.id);
        c.error = c.count;
        c.count += 1;
        c.id = id.into();
        self.index.insert(id.into(), i);
    }
}

impl HotKeys {
    /// The `n` keys with the highest estimated reads, highest first.
    pub fn top(&self, n: usize) -> Vec<HotKey> {
        let table = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<&Counter> = table.counters.iter().collect();
        all.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.id.cmp(&b.id)));
        let scale = u64::from(SAMPLE_EVERY);
        all.into_iter()
            .take(n)
            .map(|c| {
                let (db, key) = c.id.split_at(4);
                HotKey {
                    db: u32::from_be_bytes([db[0], db[1], db[2], db[3]]),
                    key: key.to_vec(),
                    count: c.count * scale,
                    error: c.error * scale,
                }
            })
            .collect()
    }

    /// Adds a session's samples.
    fn add_all(&self, samples: &Samples) {
        let mut table = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut at = 0;
        for &len in &samples.lens {
            let end = at + len as usize;
            table.add(&samples.bytes[at..end]);
            at = end;
        }
    }
}

/// Sampled ids (database and key, as [`Counter::id`]), back to back in
/// one buffer.
#[derive(Debug, Default)]
struct Samples {
    bytes: Vec<u8>,
    lens: Vec<u32>,
}

/// A session's sampler: plain integers and reused buffers, flushed into
/// [`HotKeys`] in batches (and on [`HotKeySampler::flush`]).
#[derive(Debug)]
pub struct HotKeySampler {
    /// Counts reads down to the next sample.
    countdown: u32,
    samples: Samples,
}

impl HotKeySampler {
    /// A sampler whose first sample is `offset` reads away (sessions start
    /// at different offsets, so one-read connections are still sampled).
    pub fn new(offset: u64) -> Self {
        Self {
            countdown: (offset % u64::from(SAMPLE_EVERY)) as u32,
            samples: Samples::default(),
        }
    }

    /// One cacheable read of `key` in `db`.
    #[inline]
    pub fn read(&mut self, db: u32, key: &[u8], into: &HotKeys) {
        if self.countdown > 0 {
            self.countdown -= 1;
            return;
        }
        self.countdown = SAMPLE_EVERY - 1;
        self.sample(db, key, into);
    }

    #[cold]
    fn sample(&mut self, db: u32, key: &[u8], into: &HotKeys) {
        let key = &key[..key.len().min(MAX_KEY)];
        self.samples.bytes.extend_from_slice(&db.to_be_bytes());
        self.samples.bytes.extend_from_slice(key);
        self.samples.lens.push(4 + key.len() as u32);
        if self.samples.lens.len() >= BATCH {
            self.flush(into);
        }
    }

    /// Adds what is buffered to `into`.
    pub fn flush(&mut self, into: &HotKeys) {
        if self.samples.lens.is_empty() {
            return;
        }
        into.add_all(&self.samples);
        self.samples.lens.clear();
        self.samples.bytes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic generator (xorshift), for skewed key streams.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn counts_are_exact_while_fewer_keys_than_counters_are_read() {
        let hot = HotKeys::default();
        let mut s = HotKeySampler::new(0);
        for i in 0..(8 * 100) {
            let key = if i % 16 < 8 { b"a".as_slice() } else { b"b" };
            s.read(0, key, &hot);
        }
        s.flush(&hot);
        let top = hot.top(10);
        assert_eq!(top.len(), 2);
        assert_eq!(top.iter().map(|k| k.count).sum::<u64>(), 800);
        assert!(top.iter().all(|k| k.error == 0));
    }

    /// Guards the Space-Saving guarantee: with more distinct keys than
    /// counters, the heavy ones stay and are ranked first.
    #[test]
    fn heavy_keys_survive_a_long_tail_of_distinct_keys() {
        let hot = HotKeys::default();
        let mut s = HotKeySampler::new(0);
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..200_000 {
            let r = xorshift(&mut rng);
            // Half the reads go to five hot keys, half to 10k cold ones.
            let key = if r % 2 == 0 {
                format!("hot:{}", (r >> 8) % 5)
            } else {
                format!("cold:{}", (r >> 8) % 10_000)
            };
            s.read(0, key.as_bytes(), &hot);
        }
        s.flush(&hot);
        let top: Vec<String> = hot
            .top(5)
            .into_iter()
            .map(|k| String::from_utf8_lossy(&k.key).into_owned())
            .collect();
        for i in 0..5 {
            assert!(top.contains(&format!("hot:{i}")), "{top:?}");
        }
    }

    #[test]
    fn databases_are_counted_apart_and_long_keys_truncated() {
        let hot = HotKeys::default();
        let mut s = HotKeySampler::new(0);
        let long = vec![b'x'; 2000];
        for _ in 0..8 {
            s.read(1, b"k", &hot);
            s.read(2, b"k", &hot);
            s.read(0, &long, &hot);
        }
        s.flush(&hot);
        let top = hot.top(10);
        assert_eq!(top.len(), 3);
        assert!(top.iter().any(|k| k.db == 1) && top.iter().any(|k| k.db == 2));
        assert!(top.iter().all(|k| k.key.len() <= MAX_KEY));
    }
}
