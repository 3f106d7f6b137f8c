//! The upstream's circuit breaker: after `upstream.breaker_failures`
//! consecutive failed connection attempts (refused, reset, timed out), the
//! circuit opens and requests that need a new connection fail at once for
//! `upstream.breaker_cool_down`, instead of each waiting for an attempt that
//! will fail too; then one attempt is let through (half-open): a connection
//! made closes the circuit, a failure opens it again.
//!
//! Attempts are counted per round, not per connection slot: a failure within
//! `upstream.reconnect_min` of the last one counted is the same round (every
//! slot of every pool retrying at once), so the number of pools and slots
//! does not change how soon the circuit opens.
//!
//! Only paths that already found no live connection ask it; a request on a
//! live connection never does.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The breaker's state, as `PROXY STATS`, `/readyz` and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Requests wait for connections being made.
    Closed,
    /// Requests needing a connection fail at once, for this much longer.
    Open(Duration),
    /// The cool-down is over: the next attempt decides.
    HalfOpen,
}

impl State {
    /// `closed`, `open` or `half_open`.
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open(_) => "open",
            State::HalfOpen => "half_open",
        }
    }

    /// 0 closed, 1 open, 2 half-open (the metric's value).
    pub fn code(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open(_) => 1,
            State::HalfOpen => 2,
        }
    }
}

/// One upstream's breaker.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cool_down: Duration,
    round: Duration,
    start: Instant,
    /// Failed rounds since the last connection made.
    failures: AtomicU32,
    /// When the last counted failure was (ms since `start`, +1; 0: none).
    last_failure_ms: AtomicU64,
    /// Until when the circuit is open (ms since `start`); 0: closed.
    open_until_ms: AtomicU64,
    /// Times it opened.
    opened: AtomicU64,
    /// The last attempt's error, for the refusal's text.
    cause: Mutex<String>,
    /// Woken when it opens or closes.
    changed: Notify,
}

impl Breaker {
    /// A closed breaker that opens after `threshold` failed rounds (0: never),
    /// stays open for `cool_down`, and counts failures within `round` of each
    /// other once.
    pub fn new(threshold: u32, cool_down: Duration, round: Duration) -> Self {
        Self {
            threshold,
            cool_down,
            round,
            start: Instant::now(),
            failures: AtomicU32::new(0),
            last_failure_ms: AtomicU64::new(0),
            open_until_ms: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            cause: Mutex::new(String::new()),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }

    /// The state now.
    pub fn state(&self) -> State {
        let until = self.open_until_ms.load(Relaxed);
        if until == 0 {
            return State::Closed;
        }
        let now = self.now_ms();
        if now < until {
            State::Open(Duration::from_millis(until - now))
        } else {
            State::HalfOpen
        }
    }

    /// Times the circuit opened.
    pub fn opened(&self) -> u64 {
        self.opened.load(Relaxed)
    }

    /// Why it is open: the last failed attempt's error.
    pub fn cause(&self) -> String {
        self.cause.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A connection was made: the circuit closes.
    pub fn success(&self) {
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
        if self.open_until_ms.swap(0, Relaxed) != 0 {
            tracing::info!("upstream circuit closed: a connection was made");
            self.changed.notify_waiters();
        }
    }

    /// An attempt failed with `error`. Opens the circuit at the threshold,
    /// or again when the half-open attempt failed.
    pub fn failure(&self, error: &dyn std::fmt::Display) {
        if self.threshold == 0 {
            return;
        }
        let now = self.now_ms();
        let last = self.last_failure_ms.load(Relaxed);
        let same_round = last != 0 && now.saturating_sub(last) < self.round.as_millis() as u64;
        let half_open = self.state() == State::HalfOpen;
        if same_round && !half_open {
            return;
        }
        self.last_failure_ms.store(now, Relaxed);
        *self.cause.lock().unwrap_or_else(|e| e.into_inner()) = error.to_string();
        let failures = self.failures.fetch_add(1, Relaxed) + 1;
        if failures < self.threshold && !half_open {
            return;
        }
        let was = self
            .open_until_ms
            .swap(now + self.cool_down.as_millis() as u64, Relaxed);
        if was == 0 {
            self.opened.fetch_add(1, Relaxed);
            tracing::info!(failures, cool_down = ?self.cool_down, error = %error, "upstream circuit open: requests needing a connection fail at once until an attempt succeeds");
        }
        self.changed.notify_waiters();
    }

    /// Resolves when the circuit next opens or closes (for requests waiting
    /// on a connection). Register before checking the state, as with
    /// [`Notify`].
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// How long a slot's next attempt should wait, given its own backoff:
    /// while open, until the cool-down ends (so the half-open attempt comes
    /// right then).
    pub fn delay(&self, backoff: Duration) -> Duration {
        match self.state() {
            State::Open(left) => left,
            _ => backoff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_of_rounds_and_closes_on_a_connection() {
        let b = Breaker::new(3, Duration::from_secs(60), Duration::ZERO);
        b.failure(&"refused");
        b.failure(&"refused");
        assert_eq!(b.state(), State::Closed);
        b.failure(&"refused");
        assert!(matches!(b.state(), State::Open(left) if left > Duration::from_secs(59)));
        assert_eq!((b.opened(), b.cause().as_str()), (1, "refused"));
        b.success();
        assert_eq!(b.state(), State::Closed);
        b.failure(&"refused");
        assert_eq!(b.state(), State::Closed, "the count starts over");
    }

    #[test]
    fn failures_in_one_round_count_once() {
        let b = Breaker::new(2, Duration::from_secs(60), Duration::from_secs(60));
        for _ in 0..10 {
            b.failure(&"refused");
        }
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_failed_half_open_attempt_opens_it_again() {
        let b = Breaker::new(1, Duration::ZERO, Duration::from_secs(60));
        b.failure(&"refused");
        assert_eq!(
            b.state(),
            State::HalfOpen,
            "a zero cool-down is over at once"
        );
        b.failure(&"still refused");
        assert_eq!(b.opened(), 1, "the same opening");
        assert_eq!(b.cause(), "still refused");
        let never = Breaker::new(0, Duration::ZERO, Duration::ZERO);
        never.failure(&"refused");
        assert_eq!(never.state(), State::Closed, "threshold 0: no breaker");
    }
}
