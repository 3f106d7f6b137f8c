//! Connections to the upstream Redis.
//!
//! - [`connection`]: one TCP connection driven by one task that writes batched
//!   requests and matches replies to them in order (or relays every frame, for
//!   pub/sub and MONITOR).
//! - [`handshake`]: what every new connection sends first (HELLO, AUTH, SELECT).
//! - [`pool`]: per (database, protocol), a few shared connections that many
//!   clients pipeline through, kept alive by supervisors that reconnect with
//!   backoff, plus dedicated connections for stateful commands.

pub mod backlog;
pub mod breaker;
pub mod connection;
pub mod handshake;
pub mod lane;
pub mod outage;
pub mod pool;
mod probe;
mod relay;
pub mod transport;

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

pub use connection::{Conn, OnAnswer, Op, Replies};
pub use lane::Lane;
pub use pool::{Credentials, Pool, PoolKey, Upstream};

/// Why an upstream request failed. Each kind becomes an `-ERR upstream …`
/// reply to the client; none of them ends the client's connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (refused, unreachable, timed out, or the
    /// pool is between reconnect attempts). Answered at once.
    #[error("upstream unavailable: {0}")]
    Unavailable(Arc<str>),
    /// The connection closed or failed with this request in flight; whether a
    /// write took effect is unknown.
    #[error("upstream connection lost")]
    ConnectionLost,
    /// The request waited longer than `upstream.command_timeout`.
    #[error("upstream timeout: no reply within {0:?}")]
    Timeout(std::time::Duration),
    /// Redis refused the connection setup (bad password, database out of
    /// range…): the text is Redis's own error line, which clients get as it
    /// is — a password changed under nearcache reads `-WRONGPASS …` as it
    /// would directly.
    #[error("upstream rejected the connection: {0}")]
    Rejected(Arc<str>),
    /// Redis cannot set up a connection just now (`BUSY` running a script,
    /// `LOADING` its dataset): Redis's own error line, passed to clients as
    /// it is; the setup is tried again.
    #[error("upstream busy: {0}")]
    Busy(Arc<str>),
    /// The circuit breaker is open: connection attempts failed
    /// `upstream.breaker_failures` times in a row, the last with `cause`;
    /// the next is made in `retry_in`. Answered at once, not sent.
    #[error("upstream unavailable: {cause} (circuit open, next attempt in {} ms)", retry_in.as_millis().max(1))]
    CircuitOpen {
        /// The last attempt's error.
        cause: Arc<str>,
        /// Until the half-open attempt.
        retry_in: std::time::Duration,
    },
    /// Upstream sent bytes that are not RESP.
    #[error("upstream sent an invalid reply")]
    InvalidReply,
    /// Every permit of `upstream.max_in_flight` / `max_in_flight_bytes` was
    /// taken for this long (`command_timeout`): the command was not sent,
    /// so a retry is safe.
    #[error("upstream backlog full: waited {0:?} for room (upstream.max_in_flight), not sent")]
    Backlog(std::time::Duration),
}

impl UpstreamError {
    /// What went wrong, without the `upstream …:` prefix the variant adds
    /// (for an error that quotes another).
    pub fn cause(&self) -> String {
        match self {
            UpstreamError::Unavailable(m) => m.to_string(),
            UpstreamError::CircuitOpen { cause, .. } => cause.to_string(),
            other => other.to_string(),
        }
    }

    /// Whether a failed connection attempt with this error means the
    /// upstream is gone (so the circuit breaker counts it): a refused setup
    /// (a bad password, a database out of range) or a busy one (a script
    /// past its threshold, a dataset loading) is Redis answering.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            UpstreamError::Unavailable(_) | UpstreamError::Timeout(_)
        )
    }

    /// The RESP error reply for this failure.
    pub fn to_reply(&self) -> Bytes {
        crate::error::ProxyError::from(self).to_reply()
    }

    /// `n` copies of the error reply, one per command that gets no answer.
    pub fn to_replies(&self, n: usize) -> Bytes {
        crate::error::ProxyError::from(self).to_replies(n)
    }
}

/// Encodes arguments as a RESP array of bulk strings (for commands that did
/// not arrive in that form: inline commands, and the proxy's own requests).
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Bytes {
    let mut buf =
        BytesMut::with_capacity(16 + args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>());
    buf.put_u8(b'*');
    buf.put_slice(args.len().to_string().as_bytes());
    buf.put_slice(b"\r\n");
    for arg in args {
        let arg = arg.as_ref();
        buf.put_u8(b'$');
        buf.put_slice(arg.len().to_string().as_bytes());
        buf.put_slice(b"\r\n");
        buf.put_slice(arg);
        buf.put_slice(b"\r\n");
    }
    buf.freeze()
}
