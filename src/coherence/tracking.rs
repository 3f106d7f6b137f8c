//! Redis's own invalidations: one dedicated RESP3 connection with
//! `CLIENT TRACKING ON BCAST PREFIX …` over the cached prefixes, so writes
//! that bypass every nearcache (a script talking to Redis directly, key
//! expiry, eviction) also drop what L1 holds.
//!
//! Traps handled (see PITFALLS.md): tracking is bound to its connection, so
//! when it drops, invalidations may have been missed — L1 is flushed and
//! tracking re-enabled on a new connection; a FLUSHALL arrives as a null key
//! list and flushes L1; a server that refuses `CLIENT TRACKING` (some managed
//! services) is logged once and nearcache falls back to rule TTLs alone.

use std::sync::Arc;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::Duration;

use redis_protocol::resp3::types::OwnedFrame;
use tokio::io::AsyncWriteExt;

use crate::cache::L1;
use crate::config::RedisUrl;
use crate::protocol::Protocol;
use crate::stats::TrackingStats;
use crate::upstream::{UpstreamError, encode_command, handshake};

/// Starts the tracking task for `prefixes` (an empty prefix tracks every key).
pub fn spawn(
    url: RedisUrl,
    prefixes: Vec<Vec<u8>>,
    l1: Arc<L1>,
    timeout: Duration,
    state: Arc<TrackingStats>,
) {
    let task_state = state;
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(50);
        loop {
            match session(&url, &prefixes, &l1, timeout, &task_state).await {
                Ok(()) => return, // refused by the server: nothing to retry
                Err(e) => {
                    task_state.active.store(false, SeqCst);
                    // Whatever Redis invalidated meanwhile is unknown.
                    l1.flush();
                    tracing::warn!(error = %e, retry_in = ?delay, "redis tracking connection lost; L1 flushed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    });
}

/// One tracking connection's life: Ok(()) means Redis refused tracking.
async fn session(
    url: &RedisUrl,
    prefixes: &[Vec<u8>],
    l1: &L1,
    timeout: Duration,
    state: &TrackingStats,
) -> Result<(), UpstreamError> {
    let h = handshake::connect(url, 0, Protocol::Resp3, timeout).await?;
    let addr = url.addr();
    let (mut stream, mut buf) = (h.stream, h.leftover);
    let mut args: Vec<&[u8]> = vec![b"CLIENT", b"TRACKING", b"ON", b"BCAST"];
    // An empty prefix means "every key": BCAST with no PREFIX does that.
    if !prefixes.iter().any(|p| p.is_empty()) {
        for p in prefixes {
            args.push(b"PREFIX");
            args.push(p);
        }
    }
    stream
        .write_all(&encode_command(&args))
        .await
        .map_err(|_| UpstreamError::ConnectionLost)?;
    match handshake::read_frame(&mut stream, &mut buf, &addr).await? {
        OwnedFrame::SimpleError { data, .. } => {
            tracing::warn!(reply = %data, "Redis refused CLIENT TRACKING; L1 relies on rule TTLs for writes that bypass nearcache");
            return Ok(());
        }
        _ => {
            // Entries filled before tracking began are not covered by it.
            l1.flush();
            state.active.store(true, SeqCst);
            tracing::info!(prefixes = prefixes.len(), "redis tracking enabled");
        }
    }
    let mut scratch = Vec::new();
    loop {
        if let OwnedFrame::Push { data, .. } =
            handshake::read_frame(&mut stream, &mut buf, &addr).await?
        {
            let is_invalidate = matches!(data.first(), Some(OwnedFrame::BlobString { data, .. }) if data == b"invalidate");
            if !is_invalidate {
                continue;
            }
            match data.get(1) {
                Some(OwnedFrame::Array { data: keys, .. }) => {
                    for key in keys {
                        if let OwnedFrame::BlobString { data, .. } = key {
                            l1.invalidate_any_db(data, &mut scratch);
                            state.keys.fetch_add(1, Relaxed);
                        }
                    }
                }
                // FLUSHALL/FLUSHDB: a null key list.
                _ => l1.flush(),
            }
        }
    }
}
