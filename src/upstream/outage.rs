//! Upstream outages as the log and the metrics tell them: one line when the
//! first connection is lost (or cannot be made), one when a connection is
//! back, with how long it took — not a line per slot per retry, which an
//! outage of a few seconds would turn into hundreds.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Whether an outage is going on, since when, and how many there were.
#[derive(Debug, Default)]
pub struct Outages {
    since: Mutex<Option<Instant>>,
    count: AtomicU64,
    reconnects: AtomicU64,
}

impl Outages {
    /// A connection was lost or could not be made: true when this starts
    /// an outage (the caller logs it), false while one goes on.
    pub fn begin(&self) -> bool {
        let mut since = self.since.lock().unwrap_or_else(|e| e.into_inner());
        if since.is_some() {
            return false;
        }
        *since = Some(Instant::now());
        self.count.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A connection is up: how long the outage it ends lasted, if one was
    /// going on.
    pub fn end(&self) -> Option<Duration> {
        let mut since = self.since.lock().unwrap_or_else(|e| e.into_inner());
        let began = since.take()?;
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        Some(began.elapsed())
    }

    /// When the outage going on began, if one is.
    pub fn since(&self) -> Option<Instant> {
        *self.since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Outages so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Outages that ended with a connection back.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_loss_begins_and_only_the_first_reconnect_ends_an_outage() {
        let o = Outages::default();
        assert_eq!(o.end(), None, "no outage yet");
        assert!(o.begin());
        assert!(!o.begin(), "a second slot failing is the same outage");
        assert!(o.end().is_some());
        assert_eq!(o.end(), None, "a second slot back ends nothing");
        assert!(o.begin());
        assert_eq!((o.count(), o.reconnects()), (2, 1));
    }
}
