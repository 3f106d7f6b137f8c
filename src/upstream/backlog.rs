//! The bound on what waits for Redis: commands and request bytes in flight
//! across every upstream connection.
//!
//! When Redis slows down or stops, requests pile up between the clients and
//! Redis. Each client is bounded on its own (`max_pending_replies`), but
//! thousands of clients together are not; this is the cap on all of them.
//! A request takes its permits before it is queued on a connection and
//! gives them back when its replies arrive (or it fails); a client that
//! finds none waits, holding back only its own pipeline, for up to
//! `command_timeout`, and then gets [`UpstreamError::Backlog`] — a command
//! that was never sent, so retrying it is safe.
//!
//! The fast path is one `try_acquire_many` on each of two semaphores (an
//! atomic compare-and-swap each); only a request that must wait touches
//! tokio's wait list.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::UpstreamError;

/// The permits one request holds while it is in flight; dropping them
/// gives them back.
#[derive(Debug)]
pub struct InFlight {
    _commands: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// Commands and bytes in flight to Redis, and the caps on both.
#[derive(Debug)]
pub struct Backlog {
    commands: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_commands: u32,
    max_bytes: u32,
    wait: Duration,
    waited: AtomicU64,
    refused: AtomicU64,
}

/// What [`Backlog::stats`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BacklogStats {
    /// Commands sent or queued to Redis and not yet answered.
    pub commands: u64,
    /// Their request bytes.
    pub bytes: u64,
    /// `upstream.max_in_flight`.
    pub max_commands: u64,
    /// `upstream.max_in_flight_bytes`.
    pub max_bytes: u64,
    /// Requests that found the backlog full and waited.
    pub waited: u64,
    /// Requests refused after waiting `command_timeout`.
    pub refused: u64,
}

impl Backlog {
    /// Caps of `max_commands` commands and `max_bytes` bytes; a request
    /// waits up to `wait` for room.
    pub fn new(max_commands: usize, max_bytes: usize, wait: Duration) -> Self {
        // Semaphore permits are taken in u32s; caps beyond are caps at that.
        let max_commands = u32::try_from(max_commands.max(1)).unwrap_or(u32::MAX);
        let max_bytes = u32::try_from(max_bytes.max(1)).unwrap_or(u32::MAX);
        Self {
            commands: Arc::new(Semaphore::new(max_commands as usize)),
            bytes: Arc::new(Semaphore::new(max_bytes as usize)),
            max_commands,
            max_bytes,
            wait,
            waited: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Room for `commands` commands of `bytes` bytes, waiting for it if
    /// need be. A request larger than a cap takes the whole cap (it then
    /// goes alone).
    pub async fn admit(&self, commands: u32, bytes: usize) -> Result<InFlight, UpstreamError> {
        let commands = commands.clamp(1, self.max_commands);
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX).min(self.max_bytes);
        if let (Ok(c), Ok(b)) = (
            self.commands.clone().try_acquire_many_owned(commands),
            self.bytes.clone().try_acquire_many_owned(bytes),
        ) {
            return Ok(InFlight {
                _commands: c,
                _bytes: b,
            });
        }
        // (A permit of the pair taken above went back when it was dropped.)
        self.waited.fetch_add(1, Ordering::Relaxed);
        let both = async {
            let c = self.commands.clone().acquire_many_owned(commands).await;
            let b = self.bytes.clone().acquire_many_owned(bytes).await;
            (c, b)
        };
        match tokio::time::timeout(self.wait, both).await {
            Ok((Ok(c), Ok(b))) => Ok(InFlight {
                _commands: c,
                _bytes: b,
            }),
            _ => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(UpstreamError::Backlog(self.wait))
            }
        }
    }

    /// What is in flight now, the caps, and how often requests waited.
    pub fn stats(&self) -> BacklogStats {
        let used = |sem: &Semaphore, max: u32| u64::from(max) - sem.available_permits() as u64;
        BacklogStats {
            commands: used(&self.commands, self.max_commands),
            bytes: used(&self.bytes, self.max_bytes),
            max_commands: u64::from(self.max_commands),
            max_bytes: u64::from(self.max_bytes),
            waited: self.waited.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn permits_return_when_dropped_and_a_full_backlog_refuses_after_the_wait() {
        let backlog = Backlog::new(3, 1000, Duration::from_millis(50));
        let a = backlog.admit(2, 100).await.unwrap();
        let b = backlog.admit(1, 100).await.unwrap();
        assert_eq!(backlog.stats().commands, 3);
        assert_eq!(backlog.stats().bytes, 200);
        assert_eq!(
            backlog.admit(1, 1).await.unwrap_err(),
            UpstreamError::Backlog(Duration::from_millis(50))
        );
        drop((a, b));
        let c = backlog.admit(2, 5000).await.unwrap();
        assert_eq!(
            backlog.stats().bytes,
            1000,
            "a request over the cap takes the cap"
        );
        drop(c);
        let s = backlog.stats();
        assert_eq!((s.commands, s.bytes, s.waited, s.refused), (0, 0, 1, 1));
    }

    #[tokio::test]
    async fn a_waiting_request_goes_when_room_is_made() {
        let backlog = Arc::new(Backlog::new(1, 1000, Duration::from_secs(10)));
        let first = backlog.admit(1, 10).await.unwrap();
        let waiter = tokio::spawn({
            let backlog = backlog.clone();
            async move { backlog.admit(1, 10).await.map(|_| ()) }
        });
        // The waiter is parked on the semaphore before room is made.
        while backlog.stats().waited == 0 {
            tokio::task::yield_now().await;
        }
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(backlog.stats().refused, 0);
    }
}
