//! Which upstream connection stands for which client, for the commands that
//! name another client by id: `CLIENT TRACKING on REDIRECT <id>` and `CLIENT
//! UNBLOCK <id>` take the id a client got from `CLIENT ID`, which is
//! nearcache's; Redis knows that client only by the Redis id of the dedicated
//! connection it is pinned to (a subscriber to `__redis__:invalidate` always
//! is) or blocked on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Sessions pinned to (or blocked on) a dedicated connection, by nearcache
/// id → Redis id; and every session, by id, for `CLIENT KILL ID`.
#[derive(Debug, Default)]
pub struct Directory {
    pinned: Mutex<HashMap<u64, u64>>,
    sessions: Mutex<HashMap<u64, oneshot::Sender<()>>>,
}

/// A session's place in the [`Directory`] for as long as it runs.
#[derive(Debug)]
pub struct Enrollment {
    directory: Arc<Directory>,
    session: u64,
}

impl Drop for Enrollment {
    fn drop(&mut self) {
        self.directory
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.session);
    }
}

/// A session's entry in the [`Directory`], removed when dropped (when the
/// session lets go of the connection).
#[derive(Debug)]
pub struct Listing {
    directory: Arc<Directory>,
    session: u64,
    redis_id: u64,
}

impl Directory {
    /// Records that `session` is pinned to the connection Redis calls
    /// `redis_id`, for as long as the returned listing lives.
    pub fn list(self: &Arc<Self>, session: u64, redis_id: u64) -> Listing {
        self.lock().insert(session, redis_id);
        Listing {
            directory: self.clone(),
            session,
            redis_id,
        }
    }

    /// Enrolls a running session until the enrollment is dropped; the
    /// receiver answers `Ok` once another client kills it. (A oneshot: the
    /// session polls it on every turn of its loop, and polling one takes no
    /// lock.)
    pub fn enroll(self: &Arc<Self>, session: u64) -> (Enrollment, oneshot::Receiver<()>) {
        let (kill, killed) = oneshot::channel();
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(session, kill);
        let enrollment = Enrollment {
            directory: self.clone(),
            session,
        };
        (enrollment, killed)
    }

    /// Tells `session` to close; false if no such session runs.
    pub fn kill(&self, session: u64) -> bool {
        let kill = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&session);
        kill.is_some_and(|k| k.send(()).is_ok())
    }

    /// Redis's id for the connection `session` is pinned to, if it is.
    pub fn redis_id(&self, session: u64) -> Option<u64> {
        self.lock().get(&session).copied()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, u64>> {
        self.pinned.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Listing {
    fn drop(&mut self) {
        let mut pinned = self.directory.lock();
        // A newer pin of the same session may have replaced this entry.
        if pinned.get(&self.session) == Some(&self.redis_id) {
            pinned.remove(&self.session);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kill_reaches_an_enrolled_session_only() {
        let d = Arc::new(Directory::default());
        let (e, mut killed) = d.enroll(3);
        assert!(!d.kill(4));
        assert!(d.kill(3));
        // Delivered even though nobody was waiting yet.
        assert_eq!(killed.try_recv(), Ok(()));
        drop(e);
        assert!(!d.kill(3));
    }

    #[test]
    fn a_listing_lasts_as_long_as_the_pin_and_no_longer() {
        let d = Arc::new(Directory::default());
        let first = d.list(7, 100);
        assert_eq!(d.redis_id(7), Some(100));
        assert_eq!(d.redis_id(8), None);
        // Re-pinned: the new connection replaces the old one, and the old
        // listing going away afterwards leaves the new one in place.
        let second = d.list(7, 200);
        drop(first);
        assert_eq!(d.redis_id(7), Some(200));
        drop(second);
        assert_eq!(d.redis_id(7), None);
    }
}
