//! The read index: (db, key, protocol, request) → the cached reply, in
//! read-locked shards.
//!
//! A hit is one lookup here, and with many hot keys most of its cost is
//! waiting for memory: profiled with 10 000 keys, each dependent cache miss
//! on the way to a reply cost about 15 % of the proxy's CPU. So each cached
//! reply (a [`Variant`]) is one allocation holding a small header, the key
//! id, the request and the reply, and the table holds those allocations
//! directly: a hit reads the (dense, usually cached) table, then one buffer.
//!
//! Every variant of a key is hashed by the key's id alone, so all of them sit
//! on one probe sequence and a key is dropped by one hash.

use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use bytes::Bytes;
use hashbrown::HashTable;

use super::Viewer;
use super::held::Held;
use crate::stats::RuleStats;

/// Shards: enough that concurrent hits rarely share a lock.
const SHARDS: usize = 32;

// Header layout: expiry, refresh-ahead time (u64 ns on `clock()`, MAX for
// none), the end of its stale-if-error window (u64 ns, = expiry for none),
// id length, request length (u32), the viewer: protocol version (u8) and
// user namespace (u16), the reply's decompressed length (u32, 0 when it is
// held as it is).
const EXPIRES: usize = 0;
const REFRESH: usize = 8;
const STALE_UNTIL: usize = 16;
const ID_LEN: usize = 24;
const REQUEST_LEN: usize = 28;
const VIEWER: usize = 32;
const RAW_LEN: usize = 35;
const HEADER: usize = 39;

/// Nanoseconds since a process-wide base: expiries in 8 bytes instead of an
/// `Instant`'s 16, and compared as integers.
#[inline]
pub(super) fn clock(t: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(t.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

/// One cached reply: the header, the key id, the exact request it answers
/// (protocol included) and the encoded reply, in one shared allocation.
#[derive(Clone)]
pub(super) struct Variant(Arc<[u8]>);

impl std::fmt::Debug for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Variant")
            .field("id", &String::from_utf8_lossy(self.id()))
            .field("request", &String::from_utf8_lossy(self.request()))
            .field("reply_len", &self.reply().len())
            .field("stored_len", &self.reply().stored().len())
            .finish()
    }
}

impl Variant {
    /// The variant for these parts; None if the id, request or reply is
    /// over 4 GiB, which no cacheable read is.
    pub(super) fn new(
        viewer: Viewer,
        id: &[u8],
        request: &[u8],
        reply: Held<'_>,
        expires: Instant,
        refresh_at: Option<Instant>,
        stale_until: Instant,
    ) -> Option<Self> {
        let id_len = u32::try_from(id.len()).ok()?;
        let request_len = u32::try_from(request.len()).ok()?;
        let raw_len = u32::try_from(reply.raw_len()).ok()?;
        let reply = reply.stored();
        let mut buf = Vec::with_capacity(HEADER + id.len() + request.len() + reply.len());
        buf.extend_from_slice(&clock(expires).to_le_bytes());
        buf.extend_from_slice(&refresh_at.map_or(u64::MAX, clock).to_le_bytes());
        buf.extend_from_slice(&clock(stale_until.max(expires)).to_le_bytes());
        buf.extend_from_slice(&id_len.to_le_bytes());
        buf.extend_from_slice(&request_len.to_le_bytes());
        buf.extend_from_slice(&viewer_bytes(viewer));
        buf.extend_from_slice(&raw_len.to_le_bytes());
        buf.extend_from_slice(id);
        buf.extend_from_slice(request);
        buf.extend_from_slice(reply);
        Some(Self(buf.into()))
    }

    fn u64_at(&self, at: usize) -> u64 {
        let mut b = [0; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_le_bytes(b)
    }

    fn u32_at(&self, at: usize) -> usize {
        let mut b = [0; 4];
        b.copy_from_slice(&self.0[at..at + 4]);
        u32::from_le_bytes(b) as usize
    }

    fn request_start(&self) -> usize {
        HEADER + self.u32_at(ID_LEN)
    }

    fn request_end(&self) -> usize {
        self.request_start() + self.u32_at(REQUEST_LEN)
    }

    /// The (db, key) id.
    #[inline]
    pub(super) fn id(&self) -> &[u8] {
        &self.0[HEADER..self.request_start()]
    }

    /// Whether it is for `viewer` (its protocol and user).
    #[inline]
    pub(super) fn is_for(&self, viewer: Viewer) -> bool {
        self.0[VIEWER..RAW_LEN] == viewer_bytes(viewer)
    }

    /// The exact request this reply answers.
    #[inline]
    pub(super) fn request(&self) -> &[u8] {
        &self.0[self.request_start()..self.request_end()]
    }

    /// The encoded reply, as held.
    #[inline]
    pub(super) fn reply(&self) -> Held<'_> {
        let stored = &self.0[self.request_end()..];
        match self.u32_at(RAW_LEN) {
            0 => Held::plain(stored),
            raw_len => Held::compressed(stored, raw_len),
        }
    }

    /// Bytes compression saves on this variant.
    pub(super) fn saved(&self) -> usize {
        let reply = self.reply();
        reply.len().saturating_sub(reply.stored().len())
    }

    /// When it expires, on [`clock`].
    #[inline]
    pub(super) fn expires(&self) -> u64 {
        self.u64_at(EXPIRES)
    }

    /// Until when it may be served past its expiry while Redis is
    /// unreachable (stale-if-error), on [`clock`]; its expiry if not at all.
    #[inline]
    pub(super) fn stale_until(&self) -> u64 {
        self.u64_at(STALE_UNTIL)
    }

    /// Whether a hit at `now` (on [`clock`]) should refresh it ahead.
    #[inline]
    pub(super) fn refresh_due(&self, now: u64) -> bool {
        let at = self.u64_at(REFRESH);
        at != u64::MAX && now >= at
    }

    /// Bytes held, for the weigher.
    pub(super) fn size(&self) -> usize {
        self.0.len() + 16 + std::mem::size_of::<Self>()
    }

    /// Whether this is the reply to `request` on (db, key) for `viewer`.
    #[inline]
    fn answers(&self, db: u32, key: &[u8], viewer: Viewer, request: &[u8]) -> bool {
        self.is_for(viewer) && is_id(self.id(), db, key) && same_request(self.request(), request)
    }
}

/// Whether two requests are the same command: byte for byte, but for the
/// command name's case (`GET` from redis-py, `get` from ioredis, and a
/// warmed entry's `GET` are one request; keys and arguments stay exact).
#[inline]
pub(super) fn same_request(a: &[u8], b: &[u8]) -> bool {
    a == b || (a.len() == b.len() && names_differ_only_in_case(a, b))
}

#[cold]
fn names_differ_only_in_case(a: &[u8], b: &[u8]) -> bool {
    // `*N\r\n$L\r\n<name>\r\n…`: the name starts after the second newline.
    let newline = |from: usize| a[from..].iter().position(|&c| c == b'\n').map(|p| from + p);
    let Some(first) = newline(0) else {
        return false;
    };
    let Some(second) = newline(first + 1) else {
        return false;
    };
    let start = second + 1;
    let Some(len) = a
        .get(first + 2..second - 1)
        .and_then(crate::protocol::parser::parse_i64)
        .and_then(|l| usize::try_from(l).ok())
    else {
        return false;
    };
    let end = start + len;
    end <= a.len()
        && a[..start] == b[..start]
        && a[start..end].eq_ignore_ascii_case(&b[start..end])
        && a[end..] == b[end..]
}

/// Whether `id` is the id of (db, key) (see `key_id` in the parent module).
#[inline]
fn is_id(id: &[u8], db: u32, key: &[u8]) -> bool {
    id.len() == 4 + key.len() && id[..4] == db.to_le_bytes() && &id[4..] == key
}

/// The (db, key) an id names.
fn split_id(id: &[u8]) -> Option<(u32, &[u8])> {
    let db = id.get(..4)?;
    Some((u32::from_le_bytes([db[0], db[1], db[2], db[3]]), &id[4..]))
}

#[inline]
fn viewer_bytes(viewer: Viewer) -> [u8; 3] {
    let [a, b] = viewer.user.to_le_bytes();
    [viewer.proto.version() as u8, a, b]
}

/// Usually one (one command, one protocol).
pub(super) type Variants = smallvec::SmallVec<[Variant; 1]>;

/// Every cached reply for one key: moka's unit of weight, expiry and
/// eviction (hits never read it; they go through the [`Index`]).
#[derive(Debug)]
pub(super) struct KeyEntry {
    /// The index hash of the id.
    hash: u64,
    /// Its rule's counters (bytes held, evictions, invalidations).
    pub(super) stats: Arc<RuleStats>,
    pub(super) weight: u32,
    /// Bytes compression saves on its variants (out of the rule's
    /// `compression_saved` while it is held).
    pub(super) saved: u32,
    pub(super) variants: Variants,
    /// The key's generation (stripe, flush epoch) its last fill began at.
    pub(super) generation: (u64, u64),
}

impl KeyEntry {
    /// An entry for `variants` (all for one id, whose index hash is `hash`).
    pub(super) fn new(hash: u64, stats: Arc<RuleStats>, variants: Variants) -> Self {
        let bytes =
            std::mem::size_of::<Self>() + 32 + variants.iter().map(Variant::size).sum::<usize>();
        let saved = variants.iter().map(Variant::saved).sum::<usize>();
        let saved = u32::try_from(saved).unwrap_or(u32::MAX);
        Self {
            hash,
            stats,
            variants,
            weight: u32::try_from(bytes).unwrap_or(u32::MAX),
            saved,
            generation: (0, 0),
        }
    }

    /// When its last variant may no longer be served, not even stale, on
    /// [`clock`]: moka keeps the entry until then.
    pub(super) fn last_expiry(&self) -> Option<u64> {
        self.variants.iter().map(Variant::stale_until).max()
    }
}

type Shard = RwLock<HashTable<Variant>>;

/// The sharded index.
#[derive(Debug, Default)]
pub(super) struct Index {
    /// Keys are the application's own (not an attacker's), and hashing them
    /// is on every hit: foldhash, seeded per process, instead of SipHash.
    hasher: foldhash::fast::RandomState,
    shards: [Shard; SHARDS],
}

impl Index {
    /// The hash of (db, key), as a [`KeyEntry`] must carry it. Computed
    /// from the parts, so a lookup need not assemble the id first.
    #[inline]
    pub(super) fn hash(&self, db: u32, key: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write_u32(db);
        h.write(key);
        h.finish()
    }

    fn hash_id(&self, id: &[u8]) -> u64 {
        split_id(id).map_or(0, |(db, key)| self.hash(db, key))
    }

    #[inline]
    fn shard(&self, hash: u64) -> &Shard {
        // Neither the low bits (the table's bucket) nor the top 7 (its tag).
        &self.shards[(hash >> 32) as usize % SHARDS]
    }

    /// Runs `f` on the variant answering `request` on (db, key) in
    /// `proto`, if cached, under the shard's read lock.
    #[inline]
    pub(super) fn with<T>(
        &self,
        (db, key): (u32, &[u8]),
        viewer: Viewer,
        request: &[u8],
        f: impl FnOnce(&Variant) -> Option<T>,
    ) -> Option<T> {
        let hash = self.hash(db, key);
        let shard = self.shard(hash).read().unwrap_or_else(|e| e.into_inner());
        shard
            .find(hash, |v| v.answers(db, key, viewer, request))
            .and_then(f)
    }

    /// Makes `entry`'s variants the only ones of its id.
    pub(super) fn insert(&self, entry: &KeyEntry) {
        let Some(id) = entry.variants.first().map(Variant::id) else {
            return;
        };
        let mut shard = self
            .shard(entry.hash)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        while let Ok(old) = shard.find_entry(entry.hash, |v| v.id() == id) {
            old.remove();
        }
        for v in &entry.variants {
            shard.insert_unique(entry.hash, v.clone(), |v| self.hash_id(v.id()));
        }
    }

    /// Removes every variant of (db, key); returns whether there was any.
    pub(super) fn remove(&self, db: u32, key: &[u8]) -> bool {
        self.remove_hashed(self.hash(db, key), db, key)
    }

    /// [`Index::remove`] when the caller has the key's [hash](Index::hash).
    pub(super) fn remove_hashed(&self, hash: u64, db: u32, key: &[u8]) -> bool {
        let mut shard = self.shard(hash).write().unwrap_or_else(|e| e.into_inner());
        let mut found = false;
        while let Ok(old) = shard.find_entry(hash, |v| is_id(v.id(), db, key)) {
            old.remove();
            found = true;
        }
        found
    }

    /// Removes every variant of the key `id` names.
    pub(super) fn remove_id(&self, id: &[u8]) -> bool {
        split_id(id).is_some_and(|(db, key)| self.remove(db, key))
    }

    /// Removes `entry`'s variants if they are still the ones indexed (moka
    /// evicted or expired that entry; a newer one must stay).
    pub(super) fn remove_if_same(&self, entry: &KeyEntry) {
        let mut shard = self
            .shard(entry.hash)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        for v in &entry.variants {
            if let Ok(found) = shard.find_entry(entry.hash, |cur| Arc::ptr_eq(&cur.0, &v.0)) {
                found.remove();
            }
        }
    }

    /// The ids for which `pick` is true.
    pub(super) fn ids_where(&self, pick: impl Fn(&[u8]) -> bool) -> Vec<Bytes> {
        let mut ids: Vec<Bytes> = self
            .shards
            .iter()
            .flat_map(|shard| {
                let shard = shard.read().unwrap_or_else(|e| e.into_inner());
                shard
                    .iter()
                    .map(Variant::id)
                    .filter(|id| pick(id))
                    .map(Bytes::copy_from_slice)
                    .collect::<Vec<_>>()
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Removes everything.
    pub(super) fn clear(&self) {
        for shard in &self.shards {
            shard.write().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Protocol;

    #[test]
    fn requests_match_whatever_the_case_of_the_command_name() {
        let get = b"*2\r\n$3\r\nGET\r\n$3\r\nt:a\r\n";
        assert!(same_request(get, b"*2\r\n$3\r\nget\r\n$3\r\nt:a\r\n"));
        assert!(same_request(get, b"*2\r\n$3\r\ngEt\r\n$3\r\nt:a\r\n"));
        assert!(!same_request(get, b"*2\r\n$3\r\nGET\r\n$3\r\nT:A\r\n"));
        assert!(!same_request(get, b"*2\r\n$3\r\nget\r\n$3\r\nt:b\r\n"));
        assert!(!same_request(get, b"*2\r\n$3\r\nSET\r\n$3\r\nt:a\r\n"));
        assert!(!same_request(b"*1\r\n", b"*2\r\n"));
        assert!(!same_request(b"*1\r\n$9\r\nA\r\n", b"*1\r\n$9\r\na\r\n"));
    }

    #[test]
    fn a_variant_keeps_its_parts_apart() {
        // Later than the clock's base, whenever that was set.
        let now = Instant::now() + std::time::Duration::from_secs(1);
        let v = Variant::new(
            Protocol::Resp3.into(),
            b"id",
            b"req",
            Held::plain(b"reply"),
            now,
            None,
            now,
        )
        .expect("small parts");
        assert_eq!(v.id(), b"id");
        assert_eq!(v.request(), b"req");
        assert_eq!(v.reply().as_plain(), Some(&b"reply"[..]));
        assert!(v.is_for(Protocol::Resp3.into()) && !v.is_for(Protocol::Resp2.into()));
        let alice = Viewer {
            proto: Protocol::Resp3,
            user: 7,
        };
        let w = Variant::new(alice, b"id", b"req", Held::plain(b"reply"), now, None, now)
            .expect("small parts");
        assert!(w.is_for(alice) && !w.is_for(Protocol::Resp3.into()));
        assert_eq!(
            (w.id(), w.request(), w.reply().as_plain()),
            (&b"id"[..], &b"req"[..], Some(&b"reply"[..]))
        );
        assert_eq!(v.expires(), clock(now));
        assert!(!v.refresh_due(u64::MAX - 1));
        let r = Variant::new(
            Protocol::Resp2.into(),
            b"",
            b"",
            Held::plain(b""),
            now,
            Some(now),
            now,
        )
        .expect("empty parts");
        assert!(r.refresh_due(clock(now)) && !r.refresh_due(clock(now) - 1));
        // The stale window ends at the expiry at the earliest.
        assert_eq!(r.stale_until(), clock(now));
        let later = now + std::time::Duration::from_secs(5);
        let s = Variant::new(
            Protocol::Resp2.into(),
            b"",
            b"",
            Held::plain(b""),
            now,
            None,
            later,
        )
        .expect("empty parts");
        assert_eq!((s.expires(), s.stale_until()), (clock(now), clock(later)));
        let early = Variant::new(
            Protocol::Resp2.into(),
            b"",
            b"",
            Held::plain(b""),
            later,
            None,
            now,
        )
        .expect("empty parts");
        assert_eq!(early.stale_until(), clock(later));
        assert_eq!(
            (r.id(), r.request(), r.reply().as_plain()),
            (&b""[..], &b""[..], Some(&b""[..]))
        );
    }

    #[test]
    fn variants_of_one_key_share_a_hash_and_leave_together() {
        let index = Index::default();
        let now = Instant::now();
        let id = [&0u32.to_le_bytes()[..], b"k"].concat();
        let variant = |req: &[u8]| {
            Variant::new(
                Protocol::Resp2.into(),
                &id,
                req,
                Held::plain(b"r"),
                now,
                None,
                now,
            )
            .expect("small parts")
        };
        let entry = KeyEntry::new(
            index.hash(0, b"k"),
            Arc::default(),
            [variant(b"a"), variant(b"b")].into_iter().collect(),
        );
        index.insert(&entry);
        let found = |req: &[u8]| {
            index
                .with((0, &b"k"[..]), Protocol::Resp2.into(), req, |_| Some(()))
                .is_some()
        };
        assert!(found(b"a") && found(b"b") && !found(b"c"));
        // A refill replaces every variant of the key.
        let refill = KeyEntry::new(
            index.hash(0, b"k"),
            Arc::default(),
            [variant(b"c")].into_iter().collect(),
        );
        index.insert(&refill);
        assert!(!found(b"a") && !found(b"b") && found(b"c"));
        // An evicted entry that is no longer indexed removes nothing.
        index.remove_if_same(&entry);
        assert!(found(b"c"));
        assert!(!index.remove(1, b"k"), "another database's key");
        assert!(index.remove(0, b"k"));
        assert!(!found(b"c"));
    }
}
