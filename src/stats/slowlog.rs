//! `PROXY SLOWLOG`: the latest upstream calls whose reply took longer than
//! `admin.slowlog_threshold`, at most `admin.slowlog_len` of them.
//!
//! Recorded where a slot's replies arrive (the outbox), where their latency
//! is known anyway: a call under the threshold costs one relaxed load and a
//! comparison; only one over it takes the lock. Latency is measured as the
//! request path measures it: from the read that brought the commands to their
//! reply being ready to write. Commands that may block (`BLPOP`, `WAIT`…)
//! are left out, as Redis leaves their waiting out of its own slow log.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Path, Timing};

/// One slow call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlowEntry {
    /// Increasing from 1 over the process's life.
    pub id: u64,
    /// When its replies arrived, Unix seconds.
    pub unix_time: u64,
    /// How long they took, µs.
    pub latency_us: u64,
    /// The way they went (`shared`, `pinned`, `script`).
    pub path: &'static str,
    /// The first command of the call, by its full name (`get`,
    /// `config|get`); `?` for one the command table does not know.
    pub command: &'static str,
    /// Commands in the call (a pipelined run is one call).
    pub commands: u32,
}

/// The slow log (see the module's doc).
#[derive(Debug)]
pub struct Slowlog {
    /// µs; u64::MAX while off.
    threshold_us: AtomicU64,
    len: AtomicU64,
    next_id: AtomicU64,
    entries: Mutex<VecDeque<SlowEntry>>,
}

impl Default for Slowlog {
    /// Off until [`Slowlog::configure`]d.
    fn default() -> Self {
        Self {
            threshold_us: AtomicU64::new(u64::MAX),
            len: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            entries: Mutex::new(VecDeque::new()),
        }
    }
}

impl Slowlog {
    /// Records calls slower than `threshold`, keeping the latest `len`
    /// (0: none).
    pub fn configure(&self, threshold: Duration, len: usize) {
        let us = u64::try_from(threshold.as_micros()).unwrap_or(u64::MAX);
        self.threshold_us
            .store(if len == 0 { u64::MAX } else { us }, Relaxed);
        self.len.store(len as u64, Relaxed);
    }

    /// A call of `commands` commands that took `latency_us` on `timing`'s
    /// path.
    #[inline]
    pub fn note(&self, timing: &Timing, commands: u32, latency_us: u64) {
        if latency_us <= self.threshold_us.load(Relaxed) || timing.path == Path::Blocking {
            return;
        }
        self.record(timing, commands, latency_us);
    }

    #[cold]
    fn record(&self, timing: &Timing, commands: u32, latency_us: u64) {
        let unix_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let entry = SlowEntry {
            id: self.next_id.fetch_add(1, Relaxed),
            unix_time,
            latency_us,
            path: timing.path.name(),
            command: if timing.command.is_empty() {
                "?"
            } else {
                timing.command
            },
            commands,
        };
        let len = self.len.load(Relaxed) as usize;
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.push_front(entry);
        entries.truncate(len);
    }

    /// The latest `n` entries, newest first.
    pub fn latest(&self, n: usize) -> Vec<SlowEntry> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.iter().take(n).cloned().collect()
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every entry (`PROXY SLOWLOG RESET`).
    pub fn reset(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn timing(path: Path, command: &'static str) -> Timing {
        Timing {
            path,
            since: Instant::now(),
            command,
        }
    }

    #[test]
    fn only_calls_over_the_threshold_are_kept_newest_first_and_bounded() {
        let log = Slowlog::default();
        log.note(&timing(Path::Shared, "get"), 1, 1_000_000);
        assert!(log.is_empty(), "off until configured");
        log.configure(Duration::from_millis(10), 2);
        log.note(&timing(Path::Shared, "get"), 1, 10_000);
        log.note(&timing(Path::Blocking, "blpop"), 1, 50_000);
        assert!(log.is_empty(), "at the threshold, or blocking: not slow");
        log.note(&timing(Path::Shared, "debug"), 1, 50_000);
        log.note(&timing(Path::Script, "eval"), 2, 60_000);
        log.note(&timing(Path::Shared, ""), 1, 70_000);
        let latest = log.latest(10);
        assert_eq!(latest.len(), 2);
        assert_eq!((latest[0].command, latest[0].latency_us), ("?", 70_000));
        assert_eq!((latest[1].command, latest[1].commands), ("eval", 2));
        assert!(latest[0].id > latest[1].id);
        log.reset();
        assert!(log.is_empty());
    }
}
