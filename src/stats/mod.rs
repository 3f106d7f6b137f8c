//! One registry of counters, in the context every component shares: the
//! request path records commands by class, latency by path and errors by
//! kind; L1 records into each rule's counters (found by the rule's selector,
//! so a rule that survives a reload keeps them); the bus and Redis tracking
//! into theirs. `PROXY STATS` (and any exporter) reads it; nothing here
//! depends on who reads.
//!
//! Recording stays off the hot path's critical cost: everything is a relaxed
//! atomic, and a session adds up its commands in a [`Tally`] of plain
//! integers that it adds to the registry once per batch of input.

mod cache;
mod coherence;
mod histogram;
mod hotkeys;
mod slowlog;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use cache::{BIG_KEYS_PER_RULE, BigKey, BigKeys, RuleStats};
pub use coherence::{BusStats, PeerSeen, TrackingStats};
pub use histogram::Histogram;
pub use hotkeys::{HotKey, HotKeySampler, HotKeys};
pub use slowlog::{SlowEntry, Slowlog};

use crate::command::{CommandSpec, flag};
use crate::error::ErrorKind;

/// What kind of command, for counting (from the command table's flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Reads (`readonly`).
    Read,
    /// Writes (`write`).
    Write,
    /// Commands that may block (`blocking`, `WAIT`).
    Blocking,
    /// Pub/Sub.
    PubSub,
    /// MULTI, EXEC, WATCH…
    Transaction,
    /// EVAL, FCALL, SCRIPT, FUNCTION…
    Scripting,
    /// Connection state (SELECT, HELLO, CLIENT…).
    Connection,
    /// Administration (`admin`: CONFIG, DEBUG, SHUTDOWN…).
    Admin,
    /// nearcache's own `PROXY …`.
    Proxy,
    /// Anything else, and commands the table does not know.
    Other,
}

impl Class {
    /// Every class, in index order.
    pub const ALL: [Class; 10] = [
        Class::Read,
        Class::Write,
        Class::Blocking,
        Class::PubSub,
        Class::Transaction,
        Class::Scripting,
        Class::Connection,
        Class::Admin,
        Class::Proxy,
        Class::Other,
    ];

    /// The class of a command (None: not in the table).
    #[inline]
    pub fn of(spec: Option<&CommandSpec>) -> Class {
        let Some(spec) = spec else {
            return Class::Other;
        };
        let f = spec.flags;
        if f & flag::ADMIN != 0 {
            Class::Admin
        } else if f & flag::BLOCKING != 0 {
            Class::Blocking
        } else if f & flag::PUBSUB != 0 {
            Class::PubSub
        } else if f & flag::TRANSACTION != 0 {
            Class::Transaction
        } else if f & flag::SCRIPTING != 0 {
            Class::Scripting
        } else if f & flag::WRITE != 0 {
            Class::Write
        } else if f & flag::READONLY != 0 {
            Class::Read
        } else if f & flag::CONNECTION != 0 {
            Class::Connection
        } else {
            Class::Other
        }
    }

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Write => "write",
            Class::Blocking => "blocking",
            Class::PubSub => "pubsub",
            Class::Transaction => "transaction",
            Class::Scripting => "scripting",
            Class::Connection => "connection",
            Class::Admin => "admin",
            Class::Proxy => "proxy",
            Class::Other => "other",
        }
    }
}

/// Which way a reply came, for latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Served from L1.
    L1Hit,
    /// Over a shared upstream connection (forwarded, or an L1 miss).
    Shared,
    /// Over a pinned connection (inside MULTI or WATCH).
    Pinned,
    /// A command that may block (`BLPOP`, `WAIT`…), on a dedicated connection.
    Blocking,
    /// Scripts and functions, on a dedicated connection.
    Script,
}

impl Path {
    /// Every path, in index order.
    pub const ALL: [Path; 5] = [
        Path::L1Hit,
        Path::Shared,
        Path::Pinned,
        Path::Blocking,
        Path::Script,
    ];

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Path::L1Hit => "l1_hit",
            Path::Shared => "shared",
            Path::Pinned => "pinned",
            Path::Blocking => "blocking",
            Path::Script => "script",
        }
    }
}

/// Where a slot's replies come from and since when they are awaited, so
/// their latency can be recorded when they arrive.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The path the replies take.
    pub path: Path,
    /// When the commands were read.
    pub since: Instant,
    /// The first command's full name (`""` if not in the command table),
    /// for the slow log.
    pub command: &'static str,
}

/// The request path's counters.
#[derive(Debug, Default)]
pub struct RequestStats {
    commands: [AtomicU64; Class::ALL.len()],
    latency_us: [Histogram; Path::ALL.len()],
    errors: [AtomicU64; ErrorKind::ALL.len()],
    /// Clients connected now.
    pub clients: AtomicU64,
}

impl RequestStats {
    /// Commands handled, by class.
    pub fn commands(&self) -> impl Iterator<Item = (Class, u64)> + '_ {
        Class::ALL
            .into_iter()
            .map(|c| (c, self.commands[c as usize].load(Relaxed)))
    }

    /// Reply latency (µs, from the read that brought the command to the
    /// reply being ready to write), by path.
    pub fn latency(&self, path: Path) -> &Histogram {
        &self.latency_us[path as usize]
    }

    /// Records `n` replies that took `timing`'s path and arrived now;
    /// returns how long they took (µs).
    #[inline]
    pub fn replied(&self, timing: Timing, n: u64) -> u64 {
        let us = u64::try_from(timing.since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.latency_us[timing.path as usize].record_n(us, n);
        us
    }

    /// Counts an error nearcache answered with (a refusal, or `n` commands
    /// failed by the upstream).
    #[inline]
    pub fn error(&self, kind: ErrorKind, n: u64) {
        self.errors[kind.index()].fetch_add(n, Relaxed);
    }

    /// Errors by kind.
    pub fn errors(&self) -> impl Iterator<Item = (ErrorKind, u64)> + '_ {
        ErrorKind::ALL
            .into_iter()
            .map(|k| (k, self.errors[k.index()].load(Relaxed)))
    }
}

/// A session's counts since its last batch, added to the registry in one go.
#[derive(Debug, Default)]
pub struct Tally {
    commands: [u64; Class::ALL.len()],
    /// L1 hits in this batch (their latency is recorded together).
    pub hits: u64,
}

impl Tally {
    /// One command of `class`.
    #[inline]
    pub fn command(&mut self, class: Class) {
        self.commands[class as usize] += 1;
    }

    /// Adds the counts to `stats` and starts again; the batch's L1 hits were
    /// all read at `since`.
    pub fn flush(&mut self, stats: &RequestStats, since: Instant) {
        for (n, total) in self.commands.iter_mut().zip(&stats.commands) {
            if *n != 0 {
                total.fetch_add(std::mem::take(n), Relaxed);
            }
        }
        if self.hits != 0 {
            let timing = Timing {
                path: Path::L1Hit,
                since,
                command: "",
            };
            stats.replied(timing, std::mem::take(&mut self.hits));
        }
    }
}

/// Every counter of the process.
#[derive(Debug, Default)]
pub struct Stats {
    /// When the process started (for uptime).
    pub started: Started,
    /// The request path.
    pub requests: RequestStats,
    /// The most-read keys.
    pub hot_keys: HotKeys,
    /// Slow upstream calls.
    pub slowlog: Slowlog,
    /// The coherence bus.
    pub bus: Arc<BusStats>,
    /// Redis tracking.
    pub tracking: Arc<TrackingStats>,
    /// Client TLS handshakes.
    pub tls: TlsStats,
    /// Warming L1.
    pub warm: WarmStats,
    rules: Mutex<HashMap<String, Arc<RuleStats>>>,
    limits: Mutex<HashMap<String, Arc<LimitStats>>>,
}

/// Warming L1 (`fill::warm`).
#[derive(Debug, Default)]
pub struct WarmStats {
    /// A pass is running.
    pub running: AtomicBool,
    /// Passes finished (walked every warmed rule, or stopped at a bound).
    pub passes: AtomicU64,
    /// Passes given up (Redis unreachable, an error reply).
    pub failed: AtomicU64,
    /// Keys filled, over every pass.
    pub keys: AtomicU64,
    /// Keys fetched because a peer named them among its hot keys.
    pub peer_keys: AtomicU64,
    /// Keys the current (or last) pass filled.
    pub last_keys: AtomicU64,
    /// How long the last finished pass took, in ms.
    pub last_ms: AtomicU64,
}

/// Client TLS handshakes, by how they ended.
#[derive(Debug, Default)]
pub struct TlsStats {
    /// Handshakes completed.
    pub ok: AtomicU64,
    /// Handshakes refused or broken (a plain-text client, an unknown CA, an
    /// expired certificate…).
    pub failed: AtomicU64,
    /// Clients that did not finish within `server.tls.handshake_timeout`.
    pub timeout: AtomicU64,
}

impl TlsStats {
    /// `(outcome, count)` for each outcome, as the metric labels them.
    pub fn outcomes(&self) -> [(&'static str, u64); 3] {
        [
            ("ok", self.ok.load(Relaxed)),
            ("failed", self.failed.load(Relaxed)),
            ("timeout", self.timeout.load(Relaxed)),
        ]
    }
}

/// When the registry was made: at the process's start.
#[derive(Debug, Clone, Copy)]
pub struct Started(pub Instant);

impl Default for Started {
    fn default() -> Self {
        Self(Instant::now())
    }
}

/// Counters for one rate limit.
#[derive(Debug, Default)]
pub struct LimitStats {
    /// Commands let through (at once or after a delay).
    pub allowed: AtomicU64,
    /// Commands held before they were let through or refused.
    pub delayed: AtomicU64,
    /// Commands refused.
    pub rejected: AtomicU64,
}

impl Stats {
    /// A registry for `cfg` (the slow log's threshold and length).
    pub fn new(cfg: &crate::config::Config) -> Self {
        let stats = Self::default();
        stats
            .slowlog
            .configure(cfg.admin.slowlog_threshold.0, cfg.admin.slowlog_len);
        stats
    }

    /// Every rate limit's rejections so far (for `INFO`).
    pub fn limits_rejected(&self) -> u64 {
        let limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        limits.values().map(|l| l.rejected.load(Relaxed)).sum()
    }

    /// The counters of the rule named by `selector` (`prefix:ticker:`,
    /// `pattern:candles:*`), created on first use and kept for the life of
    /// the process, so a rule keeps its counters across a reload.
    pub fn rule(&self, selector: &str) -> Arc<RuleStats> {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        rules.entry(selector.to_owned()).or_default().clone()
    }

    /// The counters of the limit called `name`, kept across reloads as a
    /// rule's are.
    pub fn limit(&self, name: &str) -> Arc<LimitStats> {
        let mut limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        limits.entry(name.to_owned()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_keeps_its_counters_by_selector() {
        let stats = Stats::default();
        let a = stats.rule("prefix:ticker:");
        RuleStats::inc(&a.hits);
        assert_eq!(stats.rule("prefix:ticker:").hits.load(Relaxed), 1);
        assert_eq!(stats.rule("pattern:ticker:").hits.load(Relaxed), 0);
    }

    #[test]
    fn a_tally_adds_up_per_batch() {
        let stats = RequestStats::default();
        let mut tally = Tally::default();
        tally.command(Class::Read);
        tally.command(Class::Read);
        tally.command(Class::Write);
        tally.hits = 2;
        tally.flush(&stats, Instant::now());
        tally.flush(&stats, Instant::now());
        let counts: HashMap<&str, u64> = stats.commands().map(|(c, n)| (c.name(), n)).collect();
        assert_eq!(
            (counts["read"], counts["write"], counts["admin"]),
            (2, 1, 0)
        );
        assert_eq!(stats.latency(Path::L1Hit).count(), 2);
        assert_eq!(stats.latency(Path::Shared).count(), 0);
    }

    #[test]
    fn classes_follow_the_command_table() {
        let class = |n: &str| Class::of(crate::command::lookup(n.as_bytes()));
        assert_eq!(class("get"), Class::Read);
        assert_eq!(class("set"), Class::Write);
        assert_eq!(class("blpop"), Class::Blocking);
        assert_eq!(class("subscribe"), Class::PubSub);
        assert_eq!(class("multi"), Class::Transaction);
        assert_eq!(class("eval"), Class::Scripting);
        assert_eq!(class("select"), Class::Connection);
        assert_eq!(class("flushall"), Class::Write);
        assert_eq!(class("config|set"), Class::Admin);
        assert_eq!(Class::of(None), Class::Other);
        for (i, c) in Class::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        for (i, p) in Path::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i);
        }
    }
}
