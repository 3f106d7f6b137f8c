//! Rate limits at admission (`[[limits]]`), on governor's GCRA buckets.
//!
//! A [`Limit`] says which commands it counts (by command or class, by key
//! glob, and whether L1 hits are free) and what one bucket is per (ip, name,
//! user, command, pattern: any combination, or none for one bucket). Buckets
//! are made on first use and shared by every session that maps to them; a
//! session keeps the ones it uses ([`SessionBuckets`]), so checking a
//! command is a lookup in the session's own map and one atomic
//! compare-and-swap, with no lock and no allocation.
//!
//! A fleet-scoped limit's rate is for all instances together: each enforces
//! `rate / live instances` (instances as the coherence bus sees them), and
//! when that number changes its buckets start afresh at the new share.

mod commands;

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

pub use commands::CommandSet;

use crate::command::CommandSpec;
use crate::config::{Action, Counts, LimitConfig, Per, Scope};
use crate::error::ProxyError;
use crate::stats::{LimitStats, Stats};

/// The limits in force, in file order.
#[derive(Debug, Default)]
pub struct Limits {
    list: Vec<Arc<Limit>>,
}

impl Limits {
    /// Builds the limits of `cfgs` (validated). A limit whose configuration
    /// is the same as one in `previous` is that one, buckets and all, so a
    /// reload does not hand every client a fresh burst. `instances` are the
    /// live instances fleet-scoped limits share their rate among.
    pub fn new(
        cfgs: &[LimitConfig],
        stats: &Stats,
        previous: Option<&Limits>,
        instances: u32,
    ) -> Limits {
        let list = cfgs
            .iter()
            .map(|cfg| {
                let same = previous.and_then(|p| p.list.iter().find(|l| l.cfg == *cfg));
                match same {
                    Some(l) => l.clone(),
                    None => Arc::new(Limit::new(cfg, stats, instances)),
                }
            })
            .collect();
        Limits { list }
    }

    /// Whether there are none (the request path then skips admission here).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// How many.
    #[inline]
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// The `i`th (panics past [`Limits::len`]).
    #[inline]
    pub fn get(&self, i: usize) -> &Limit {
        &self.list[i]
    }

    /// The limits, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Limit>> {
        self.list.iter()
    }

    /// Sets the number of live instances (at least 1): fleet-scoped limits
    /// whose share changes start new buckets at the new share.
    pub fn set_instances(&self, n: u32) {
        let n = n.max(1);
        for limit in self.list.iter().filter(|l| l.cfg.scope == Scope::Fleet) {
            if limit.instances.swap(n, Relaxed) != n {
                let mut buckets = limit.buckets.lock().unwrap_or_else(|e| e.into_inner());
                buckets.clear();
                limit.generation.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Who sends a command, as limits key it.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    /// The client's IP address.
    pub ip: IpAddr,
    /// Its name, if it set one.
    pub name: Option<&'a [u8]>,
    /// The user it runs as.
    pub user: &'a str,
}

/// Where in the request path a limit is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Before anything is done for the command; `upstream_later` says
    /// whether the command may yet be answered from L1, in which case limits
    /// that count only upstream traffic wait for [`Stage::Upstream`].
    Admission {
        /// The command may be an L1 hit.
        upstream_later: bool,
    },
    /// The command (an L1 miss, or a read L1 does not serve) is about to
    /// go to Redis.
    Upstream,
}

/// One rate limit.
#[derive(Debug)]
pub struct Limit {
    cfg: LimitConfig,
    /// "500/s per ip", for the error and `PROXY LIMITS`.
    label: String,
    commands: Option<CommandSet>,
    keys: Vec<Vec<u8>>,
    burst: u32,
    /// `cfg.per` as bits (`1 << Per as u8`), for the request path.
    per_bits: u8,
    /// Live instances the rate is shared by (fleet scope; else 1).
    instances: AtomicU32,
    /// Moves when the share changes, so sessions drop buckets of the old one.
    generation: AtomicU64,
    buckets: Mutex<HashMap<Vec<u8>, Arc<Bucket>>>,
    clock: DefaultClock,
    /// Its counters.
    pub stats: Arc<LimitStats>,
}

/// One bucket of a limit.
#[derive(Debug)]
pub struct Bucket {
    limiter: DefaultDirectRateLimiter,
    generation: u64,
}

/// A bucket's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Within the rate.
    Pass,
    /// Over it: the earliest a retry could pass.
    Wait(Duration),
    /// More than the burst: it can never pass.
    Never,
}

impl Limit {
    fn new(cfg: &LimitConfig, stats: &Stats, instances: u32) -> Limit {
        let instances = if cfg.scope == Scope::Fleet {
            instances
        } else {
            1
        };
        let burst = cfg
            .burst
            .unwrap_or(cfg.rate.count)
            .clamp(1, u64::from(u32::MAX)) as u32;
        Limit {
            label: label(cfg),
            // (Validated: a bad entry never gets here.)
            commands: (!cfg.commands.is_empty())
                .then(|| CommandSet::new(&cfg.commands).unwrap_or_default()),
            keys: cfg.keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
            burst,
            per_bits: cfg.per.iter().fold(0, |bits, &p| bits | 1 << p as u8),
            instances: AtomicU32::new(instances),
            generation: AtomicU64::new(0),
            buckets: Mutex::default(),
            clock: DefaultClock::default(),
            stats: stats.limit(&cfg.name),
            cfg: cfg.clone(),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// How the error describes it ("500/s per ip").
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Its configuration.
    pub fn config(&self) -> &LimitConfig {
        &self.cfg
    }

    /// The instances its rate is shared by now.
    pub fn instances(&self) -> u32 {
        self.instances.load(Relaxed)
    }

    /// This instance's share of the rate, per second.
    pub fn share_per_second(&self) -> f64 {
        self.cfg.rate.count as f64
            / self.cfg.rate.period.as_secs_f64()
            / f64::from(self.instances())
    }

    /// Buckets made so far.
    pub fn buckets(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the limit counts `spec` (with arguments `argv`) at `stage`:
    /// None if not; else which glob of `keys` its first key matched (0
    /// without `keys`).
    #[inline]
    pub fn applies(
        &self,
        stage: Stage,
        spec: Option<&'static CommandSpec>,
        argv: &[bytes::Bytes],
    ) -> Option<u16> {
        let now = match (self.cfg.counts, stage) {
            (Counts::Commands, Stage::Admission { .. }) => true,
            (Counts::Commands, Stage::Upstream) => false,
            (_, Stage::Admission { upstream_later }) => !upstream_later,
            (_, Stage::Upstream) => true,
        };
        if !now {
            return None;
        }
        if let Some(set) = &self.commands {
            if !set.contains(spec) {
                return None;
            }
        }
        if self.keys.is_empty() {
            return Some(0);
        }
        let key = &argv[crate::command::keys::first_key(spec?, argv)?];
        let i = self
            .keys
            .iter()
            .position(|glob| crate::glob::matches(glob, key))?;
        Some(i as u16)
    }

    /// What one command costs: 1, or its bytes.
    #[inline]
    pub fn cost(&self, bytes: impl FnOnce() -> usize) -> u32 {
        match self.cfg.counts {
            Counts::UpstreamBytes => u32::try_from(bytes()).unwrap_or(u32::MAX).max(1),
            _ => 1,
        }
    }

    /// Whether a bucket's key includes the command (or the pattern), so
    /// that a session keys its copy by them too.
    #[inline]
    fn per(&self, per: Per) -> bool {
        self.per_bits & (1 << per as u8) != 0
    }

    /// The shared bucket for `who`, sending `spec`, whose key matched glob
    /// `pattern`: made at the current share if it is new.
    pub fn bucket(
        &self,
        who: Who<'_>,
        spec: Option<&'static CommandSpec>,
        pattern: u16,
    ) -> Arc<Bucket> {
        let mut key = Vec::new();
        for per in &self.cfg.per {
            match per {
                Per::Ip => key.extend_from_slice(who.ip.to_string().as_bytes()),
                Per::Name => key.extend_from_slice(who.name.unwrap_or(b"")),
                Per::User => key.extend_from_slice(who.user.as_bytes()),
                Per::Command => key.extend_from_slice(spec.map_or("", |s| s.name).as_bytes()),
                Per::Pattern => key.extend_from_slice(&pattern.to_le_bytes()),
            }
            // (A separator no name can end in being ambiguous with the next.)
            key.extend_from_slice(&(key.len() as u32).to_le_bytes());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_BUCKETS {
            // Buckets no session holds (their clients left) go first.
            buckets.retain(|_, b| Arc::strong_count(b) > 1);
        }
        buckets
            .entry(key)
            .or_insert_with(|| Arc::new(self.new_bucket()))
            .clone()
    }

    fn new_bucket(&self) -> Bucket {
        let n = self.instances();
        let rate = self.cfg.rate;
        // One cell every period / count, times the instances sharing it.
        let every = rate.period.saturating_mul(n) / u32::try_from(rate.count).unwrap_or(u32::MAX);
        let burst = NonZeroU32::new((self.burst / n).max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(every.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        Bucket {
            limiter: RateLimiter::direct_with_clock(quota, self.clock.clone()),
            generation: self.generation.load(Relaxed),
        }
    }

    /// Takes `cost` from `bucket`.
    #[inline]
    pub fn check(&self, bucket: &Bucket, cost: u32) -> Decision {
        let outcome = if cost == 1 {
            bucket.limiter.check()
        } else {
            match bucket
                .limiter
                .check_n(NonZeroU32::new(cost).unwrap_or(NonZeroU32::MIN))
            {
                Ok(outcome) => outcome,
                Err(_) => return Decision::Never,
            }
        };
        match outcome {
            Ok(()) => Decision::Pass,
            Err(not_until) => Decision::Wait(not_until.wait_time_from(self.clock.now())),
        }
    }

    /// The refusal for a command over the limit.
    pub fn refusal(&self, decision: Decision) -> ProxyError {
        match decision {
            Decision::Never => ProxyError::over_burst(&self.cfg.name, &self.label, self.burst),
            Decision::Wait(wait) => ProxyError::rate_limited(&self.cfg.name, &self.label, wait),
            Decision::Pass => ProxyError::rate_limited(&self.cfg.name, &self.label, Duration::ZERO),
        }
    }

    /// With `action = "delay"`, the longest a command is held.
    pub fn max_wait(&self) -> Option<Duration> {
        (self.cfg.action == Action::Delay).then_some(self.cfg.max_wait.0)
    }
}

/// Beyond this many buckets in one limit, those no session holds are let go
/// (an address or name seen once does not stay forever).
const MAX_BUCKETS: usize = 10_000;

fn label(cfg: &LimitConfig) -> String {
    let mut label = cfg.rate.to_string();
    if cfg.counts == Counts::UpstreamBytes {
        label.push_str(" bytes");
    }
    if cfg.scope == Scope::Fleet {
        label.push_str(" fleet-wide");
    }
    if !cfg.per.is_empty() {
        let per: Vec<&str> = cfg.per.iter().map(|p| p.name()).collect();
        label.push_str(" per ");
        label.push_str(&per.join(" and "));
    }
    label
}

/// The buckets one session uses, by limit: the session's own map, so the
/// request path takes no lock. Dropped whole when the limits are reloaded
/// or the client's name or user changes.
#[derive(Debug, Default)]
pub struct SessionBuckets {
    /// The `Limits` these are for (its address).
    of: usize,
    /// By (limit, command, pattern); command and pattern are 0 unless the
    /// limit's buckets are per them.
    map: HashMap<(u16, usize, u16), Arc<Bucket>, foldhash::fast::RandomState>,
    /// The client's name and user the buckets were taken for (limits per
    /// name or user only).
    name: Option<Vec<u8>>,
    user: String,
}

impl SessionBuckets {
    /// The bucket of limit `i` of `limits` for this command.
    #[inline]
    pub fn get(
        &mut self,
        limits: &Limits,
        i: usize,
        who: Who<'_>,
        spec: Option<&'static CommandSpec>,
        pattern: u16,
    ) -> &Bucket {
        let of = std::ptr::from_ref(limits) as usize;
        if self.of != of {
            self.map.clear();
            self.of = of;
        }
        let limit = &limits.list[i];
        if (limit.per(Per::Name) && self.name.as_deref() != who.name)
            || (limit.per(Per::User) && self.user != who.user)
        {
            // The client renamed itself or authenticated anew: its buckets
            // are others now.
            self.map.clear();
            self.name = who.name.map(<[u8]>::to_vec);
            who.user.clone_into(&mut self.user);
        }
        let command = if limit.per(Per::Command) {
            spec.map_or(0, |s| std::ptr::from_ref(s) as usize)
        } else {
            0
        };
        let pattern = if limit.per(Per::Pattern) { pattern } else { 0 };
        let key = (i as u16, command, pattern);
        let generation = limit.generation.load(Relaxed);
        let bucket = self
            .map
            .entry(key)
            .or_insert_with(|| limit.bucket(who, spec, pattern));
        if bucket.generation != generation {
            // The fleet's share changed since it was taken.
            *bucket = limit.bucket(who, spec, pattern);
        }
        bucket
    }
}
