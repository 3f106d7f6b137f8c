//! The L1 cache: replies to hot reads, held in process and served without a
//! round trip to Redis.
//!
//! - **Shape.** One moka entry per (database, key), holding every cached reply
//!   for that key (each a *variant*: its viewer — protocol and, where Redis
//!   decides on users, the user — plus the exact request, e.g.
//!   `GET k` in RESP3, `HGET k f` in RESP2). A write drops the whole entry at
//!   once, and RESP2 and RESP3 replies are never confused.
//! - **Lifetime.** A variant lives for min(rule ttl, the key's remaining TTL in
//!   Redis), so L1 never outlives Redis's own expiry; memory is bounded by
//!   weight (`cache.max_memory`), and a rule's `compress_min_size` has larger
//!   replies held lz4-compressed (`held.rs`), weighed as stored.
//! - **No stale fill.** Invalidations bump a generation (a stripe of atomic
//!   counters hashed by key, plus an epoch for whole flushes). A miss records
//!   the generation when it starts; its fill is discarded if the generation
//!   moved. The check and the insert happen under the stripe's lock (and the
//!   epoch's, shared), which every invalidation takes too, so a fill that
//!   lost the race is never visible, not even between its insert and a
//!   re-check; and a fill keeps a key's other variants only if they were
//!   filled at its own generation.
//! - **Single flight.** Concurrent misses for the same variant share one
//!   upstream fetch.
//! - **Hits skip moka.** moka owns weight, expiry and eviction, but its read
//!   bookkeeping (epoch pinning, access log, deque moves) costs ~0.5 µs a
//!   lookup — more than the rest of a pipelined hit. Live entries are also in
//!   a sharded read `Index` (`index.rs`); a hit is one read-locked hash lookup there.
//!   Every path that removes from moka (invalidation, flush, eviction,
//!   expiry) removes from the index too, and fills go to both.

mod held;
mod index;
pub mod rules;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::sync::Cache;

pub use held::{Held, ReplyBuf, compression_pays};
use index::{Index, KeyEntry, Variant, Variants};
pub use rules::{Rule, Rules};

use crate::stats::RuleStats;

use crate::protocol::Protocol;

/// Whom a cached reply is for: RESP2 and RESP3 replies differ, and where
/// Redis decides on users (`server.auth = "redis"`) a reply filled for one
/// ACL user is served to that user only (`user` 0 is nearcache's own
/// upstream identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Viewer {
    /// The client's protocol.
    pub proto: Protocol,
    /// The user's namespace.
    pub user: u16,
}

impl From<Protocol> for Viewer {
    fn from(proto: Protocol) -> Self {
        Viewer { proto, user: 0 }
    }
}

/// Generation stripes: more stripes, fewer fills rejected because another
/// key sharing the stripe was written.
const STRIPES: usize = 4096;

/// Expire a key's entry when its last variant expires.
struct EntryExpiry;

impl moka::Expiry<Bytes, Arc<KeyEntry>> for EntryExpiry {
    fn expire_after_create(&self, _: &Bytes, v: &Arc<KeyEntry>, now: Instant) -> Option<Duration> {
        v.last_expiry()
            .map(|t| Duration::from_nanos(t.saturating_sub(index::clock(now))))
    }

    // Without this, an overwrite would keep the old entry's expiry.
    fn expire_after_update(
        &self,
        _: &Bytes,
        v: &Arc<KeyEntry>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        v.last_expiry()
            .map(|t| Duration::from_nanos(t.saturating_sub(index::clock(now))))
    }
}

/// A moment on the cache's clock: take one per request (or per MGET) and
/// reuse it for every lookup it makes.
#[derive(Debug, Clone, Copy)]
pub struct Now(u64);

impl Now {
    /// The current moment.
    #[inline]
    pub fn current() -> Self {
        Self(index::clock(Instant::now()))
    }
}

/// How a filled reply is kept: how long, and whether compressed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Keep {
    /// Served from L1 for this long.
    pub ttl: Duration,
    /// Then kept this much longer, served only while Redis is unreachable
    /// (stale-if-error; zero for none).
    pub stale_for: Duration,
    /// The fraction of `ttl` after which a hit refreshes it ahead.
    pub refresh_ahead: Option<f64>,
    /// Held compressed if at least this large (and compression pays).
    pub compress_min_size: Option<usize>,
}

/// Proof of where the generation stood when a miss began.
#[derive(Debug, Clone, Copy)]
pub struct FillToken {
    /// The key's index hash (its stripe too).
    hash: u64,
    stripe: usize,
    generation: u64,
    epoch: u64,
}

/// The cache.
pub struct L1 {
    entries: Cache<Bytes, Arc<KeyEntry>>,
    index: Arc<Index>,
    stripes: Box<[AtomicU64]>,
    /// One per stripe: a fill checks the generation and inserts under it, and
    /// an invalidation moves the generation and removes under it, so a fill
    /// that lost the race is never visible, not even for an instant.
    stripe_locks: Box<[Mutex<()>]>,
    epoch: AtomicU64,
    /// Fills hold it shared; whatever moves the epoch (flushes, pattern
    /// invalidations) holds it exclusively — the same guarantee for them.
    epoch_lock: RwLock<()>,
    /// Databases that have had fills (bit n = db n, db ≥ 63 share bit 63), so
    /// an invalidation that names no database visits only those.
    dbs_seen: AtomicU64,
    /// See [`L1::flushed`].
    flushed: tokio::sync::Notify,
}

impl std::fmt::Debug for L1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L1")
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl L1 {
    /// An empty cache holding at most `max_memory` bytes (by weight). The
    /// server makes one only when some rule caches (else the request path
    /// skips L1 entirely).
    pub fn new(max_memory: u64) -> Arc<Self> {
        // Start the cache's clock before any entry can be timed on it.
        let _ = Now::current();
        let index = Arc::new(Index::default());
        let listener_index = index.clone();
        let entries = Cache::builder()
            .max_capacity(max_memory)
            .weigher(|_: &Bytes, v: &Arc<KeyEntry>| v.weight)
            .expire_after(EntryExpiry)
            .eviction_listener(move |_: Arc<Bytes>, v: Arc<KeyEntry>, cause| {
                // Replaced: the index already holds the replacement.
                if cause != RemovalCause::Replaced {
                    listener_index.remove_if_same(&v);
                }
                v.stats.bytes.fetch_sub(i64::from(v.weight), SeqCst);
                v.stats.entries.fetch_sub(1, SeqCst);
                if v.saved != 0 {
                    v.stats
                        .compression_saved
                        .fetch_sub(i64::from(v.saved), SeqCst);
                }
                if cause == RemovalCause::Size {
                    RuleStats::inc(&v.stats.evictions);
                }
            })
            .build();
        Arc::new(Self {
            entries,
            index,
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            stripe_locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            epoch: AtomicU64::new(0),
            epoch_lock: RwLock::new(()),
            dbs_seen: AtomicU64::new(0),
            flushed: tokio::sync::Notify::new(),
        })
    }

    /// moka's deferred work (expiry, eviction, and so the index's removals).
    /// Hits do not touch moka, so the server calls this periodically.
    pub fn maintain(&self) {
        self.entries.run_pending_tasks();
    }

    /// Keys and bytes held now (after pending maintenance).
    pub fn usage(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        (self.entries.entry_count(), self.entries.weighted_size())
    }

    /// Hands the cached reply for `request` on `key`, if fresh at `now`, to
    /// `sink` (under the index's read lock: copy or decompress it, do not
    /// wait), and returns whether it is due for a refresh-ahead; None on a
    /// miss, or when `sink` returns false (a reply it could not take). The
    /// hot path: no allocation, no copy of the key.
    #[inline]
    pub fn get(
        &self,
        db: u32,
        key: &[u8],
        viewer: Viewer,
        request: &[u8],
        now: Now,
        sink: impl FnOnce(Held<'_>) -> bool,
    ) -> Option<bool> {
        self.index.with((db, key), viewer, request, |v| {
            if v.expires() <= now.0 || !sink(v.reply()) {
                return None;
            }
            Some(v.refresh_due(now.0))
        })
    }

    /// Records where the key's generation stands as a miss begins.
    pub fn begin_fill(&self, db: u32, key: &[u8]) -> FillToken {
        // The database is marked in use before the generation is read: an
        // invalidation in every database ([`L1::invalidate_any_db`]) that
        // skipped this one as unused would not move the generation, and a
        // first fill racing it would store the old value.
        let bit = 1 << db.min(63);
        if self.dbs_seen.load(SeqCst) & bit == 0 {
            self.dbs_seen.fetch_or(bit, SeqCst);
        }
        let hash = self.index.hash(db, key);
        let stripe = stripe_of(hash);
        FillToken {
            hash,
            stripe,
            generation: self.stripes[stripe].load(SeqCst),
            epoch: self.epoch.load(SeqCst),
        }
    }

    fn lock_stripe(&self, stripe: usize) -> MutexGuard<'_, ()> {
        self.stripe_locks[stripe]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn moved(&self, t: &FillToken) -> bool {
        self.stripes[t.stripe].load(SeqCst) != t.generation || self.epoch.load(SeqCst) != t.epoch
    }

    /// The reply for `request` on `key` past its expiry but within its
    /// stale-if-error window at `now` and within `max_stale` of its expiry,
    /// for a read Redis could not answer. Invalidations and flushes remove
    /// entries, so nothing written or flushed since its fill is found.
    pub fn get_stale(
        &self,
        db: u32,
        key: &[u8],
        viewer: Viewer,
        request: &[u8],
        max_stale: Duration,
    ) -> Option<Bytes> {
        let now = Now::current().0;
        let max_stale = u64::try_from(max_stale.as_nanos()).unwrap_or(u64::MAX);
        self.index.with((db, key), viewer, request, |v| {
            let until = v.stale_until().min(v.expires().saturating_add(max_stale));
            if now < until {
                v.reply().to_bytes()
            } else {
                None
            }
        })
    }

    /// Stores `reply` unless the key was invalidated since `token` was taken.
    /// Returns whether it was stored.
    #[allow(clippy::too_many_arguments)]
    pub fn fill(
        &self,
        token: FillToken,
        db: u32,
        key: &[u8],
        stats: &Arc<RuleStats>,
        viewer: Viewer,
        request: &[u8],
        reply: &[u8],
        keep: Keep,
    ) -> bool {
        // Compressed before the locks are taken: it is the slow part.
        let packed = held::compress(reply, keep.compress_min_size);
        let _epoch = self.epoch_lock.read().unwrap_or_else(|e| e.into_inner());
        let _stripe = self.lock_stripe(token.stripe);
        if self.moved(&token) {
            RuleStats::inc(&stats.stale_fills_rejected);
            return false;
        }
        let mut id = Vec::new();
        key_id(db, key, &mut id);
        let now = Instant::now();
        let expires = now + keep.ttl;
        let refresh_at = keep.refresh_ahead.map(|f| now + keep.ttl.mul_f64(f));
        let stale_until = expires + keep.stale_for;
        let held = match &packed {
            Some(packed) => Held::compressed(packed, reply.len()),
            None => Held::plain(reply),
        };
        let Some(variant) =
            Variant::new(viewer, &id, request, held, expires, refresh_at, stale_until)
        else {
            return false;
        };
        let hash = token.hash;
        let id = Bytes::from(id);
        let generation = (token.generation, token.epoch);
        let mut variants: Variants = match self.entries.get(&id) {
            // Other variants of the key are kept only if they were filled at
            // this same generation: one from before an invalidation may be a
            // stale fill that lost its race and is about to remove itself;
            // copied into this entry, it would outlive that.
            Some(old) if old.generation == generation => old
                .variants
                .iter()
                .filter(|v| {
                    v.stale_until() > index::clock(now)
                        && !(v.is_for(viewer) && index::same_request(v.request(), request))
                })
                .cloned()
                .collect(),
            _ => Variants::new(),
        };
        variants.push(variant);
        let mut entry = KeyEntry::new(hash, stats.clone(), variants);
        entry.generation = generation;
        let entry = Arc::new(entry);
        stats.bytes.fetch_add(i64::from(entry.weight), SeqCst);
        stats.entries.fetch_add(1, SeqCst);
        if entry.saved != 0 {
            stats
                .compression_saved
                .fetch_add(i64::from(entry.saved), SeqCst);
        }
        // Index first: if moka evicts the entry at once, its listener then
        // finds it in the index and removes it there too.
        self.index.insert(&entry);
        self.entries.insert(id, entry);
        RuleStats::inc(&stats.fills);
        stats.big_keys.offer(db, key, reply.len() as u64);
        true
    }

    /// Drops every cached reply for `key` and moves its generation, so fills
    /// already in flight are discarded.
    pub fn invalidate(&self, db: u32, key: &[u8], scratch: &mut Vec<u8>) {
        let hash = self.index.hash(db, key);
        let stripe = stripe_of(hash);
        let _stripe = self.lock_stripe(stripe);
        self.stripes[stripe].fetch_add(1, SeqCst);
        // moka holds nothing the index lacks (a fill inserts into both under
        // this stripe's lock), so a key not cached here costs no moka
        // lookup: the usual case for a peer's invalidations.
        if !self.index.remove_hashed(hash, db, key) {
            return;
        }
        key_id(db, key, scratch);
        if let Some(old) = self.entries.remove(&scratch[..]) {
            RuleStats::inc(&old.stats.invalidations);
        }
    }

    /// Drops `key` in every database that has cached anything (Redis's own
    /// invalidation messages name keys, not databases).
    pub fn invalidate_any_db(&self, key: &[u8], scratch: &mut Vec<u8>) {
        let seen = self.dbs_seen.load(SeqCst);
        if seen & (1 << 63) != 0 {
            // Some database ≥ 63 is in use: no cheap list, so move the epoch
            // and drop the key wherever the index has it.
            self.invalidate_matching_key(key);
            return;
        }
        let mut dbs = seen;
        while dbs != 0 {
            let db = dbs.trailing_zeros();
            self.invalidate(db, key, scratch);
            dbs &= dbs - 1;
        }
    }

    /// Drops `key` in `db`, or in every database for [`ANY_DB`].
    pub fn invalidate_at(&self, db: u32, key: &[u8], scratch: &mut Vec<u8>) {
        if db == ANY_DB {
            self.invalidate_any_db(key, scratch);
        } else {
            self.invalidate(db, key, scratch);
        }
    }

    fn invalidate_matching_key(&self, key: &[u8]) {
        let _epoch = self.epoch_lock.write().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, SeqCst);
        let ids = self.index.ids_where(|id| id.len() >= 4 && &id[4..] == key);
        for id in &ids {
            self.index.remove_id(id);
            self.entries.invalidate(id);
        }
    }

    /// Drops every cached key (in any database) matching the Redis-style glob
    /// `pattern`; returns how many. Moves the flush epoch too, so fills in
    /// flight for matching keys are discarded.
    pub fn invalidate_matching(&self, pattern: &[u8]) -> usize {
        let _epoch = self.epoch_lock.write().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, SeqCst);
        let ids = self
            .index
            .ids_where(|id| id.len() >= 4 && crate::glob::matches(pattern, &id[4..]));
        for id in &ids {
            self.index.remove_id(id);
            if let Some(old) = self.entries.remove(id) {
                RuleStats::inc(&old.stats.invalidations);
            }
        }
        ids.len()
    }

    /// Drops everything (FLUSHDB, FLUSHALL, SWAPDB, scripts with undeclared
    /// keys, a bus gap, another upstream server), and tells the warmer.
    pub fn flush(&self) {
        {
            let _epoch = self.epoch_lock.write().unwrap_or_else(|e| e.into_inner());
            self.epoch.fetch_add(1, SeqCst);
            self.index.clear();
            self.entries.invalidate_all();
        }
        self.flushed.notify_one();
    }

    /// Notified after every [`L1::flush`] (one permit kept while nobody
    /// waits): when warming starts again.
    pub fn flushed(&self) -> &tokio::sync::Notify {
        &self.flushed
    }

    /// The id of a single-flight fetch: db, protocol, the key's generation
    /// and the flush epoch, then the request. The generation is part of it so
    /// that a read issued after a write was acknowledged (which moved the
    /// generation) never joins a fetch that started before the write: it
    /// would get the old value (found by the staleness checker).
    pub fn flight_id(
        &self,
        db: u32,
        key: &[u8],
        viewer: Viewer,
        request: &[u8],
        out: &mut Vec<u8>,
    ) {
        out.clear();
        out.extend_from_slice(&db.to_le_bytes());
        out.push(viewer.proto.version() as u8);
        out.extend_from_slice(&viewer.user.to_le_bytes());
        let stripe = stripe_of(self.index.hash(db, key));
        out.extend_from_slice(&self.stripes[stripe].load(SeqCst).to_le_bytes());
        out.extend_from_slice(&self.epoch.load(SeqCst).to_le_bytes());
        out.extend_from_slice(request);
    }
}

/// The database of an [`Invalidation`] key that must be dropped in every
/// database: a script's keys, since a script may `SELECT` another database
/// before it writes them (Redis 7 runs it there, and the caller stays put).
pub const ANY_DB: u32 = u32::MAX;

/// Keys a write touched, dropped from L1 when the write is dispatched and
/// again when Redis acknowledges it (see `server::session`).
#[derive(Debug, Default)]
pub struct Invalidation {
    /// (database, key) pairs; the database may be [`ANY_DB`].
    pub keys: Vec<(u32, Bytes)>,
    /// Drop everything (FLUSHDB, FLUSHALL, SWAPDB, undeclared script keys).
    pub flush: bool,
}

impl Invalidation {
    /// Nothing to drop.
    #[inline]
    pub fn is_empty(&self) -> bool {
        !self.flush && self.keys.is_empty()
    }

    /// Adds `other`'s keys.
    pub fn extend(&mut self, other: Invalidation) {
        self.flush |= other.flush;
        if self.keys.is_empty() {
            self.keys = other.keys;
        } else {
            self.keys.extend(other.keys);
        }
    }

    /// Drops the keys (or everything) from `l1`.
    pub fn apply(&self, l1: &L1, scratch: &mut Vec<u8>) {
        if self.flush {
            l1.flush();
        }
        for (db, key) in &self.keys {
            l1.invalidate_at(*db, key, scratch);
        }
    }
}

/// The cache id of (db, key): db as 4 bytes, then the key.
#[inline]
fn key_id(db: u32, key: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&db.to_le_bytes());
    out.extend_from_slice(key);
}

/// A key's stripe, from its index hash (bits the index's shards, buckets
/// and tags do not use): one hash serves both.
#[inline]
fn stripe_of(hash: u64) -> usize {
    (hash >> 40) as usize % STRIPES
}

#[cfg(test)]
mod tests;
