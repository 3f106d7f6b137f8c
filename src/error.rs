//! The errors nearcache answers with itself, as one type that knows its
//! kind, which side failed and whether it ends the client's connection, so
//! that every refusal renders the same way and can be counted by kind.
//!
//! Replies that only emulate Redis (a syntax error of `CLIENT NO-EVICT`, say)
//! are that command's answer, not a refusal, and stay plain replies; a
//! `ProxyError` is nearcache declining to run a command, or failing to get it
//! run: bad input, authentication, arity, what a proxy cannot do, limits, and
//! the upstream being unavailable, slow or gone.

use std::borrow::Cow;

use bytes::Bytes;

use crate::protocol::{ProtocolError, reply};
use crate::upstream::UpstreamError;

/// What went wrong, for counting and for deciding what follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The client sent bytes that are not a valid command.
    Protocol,
    /// Not authenticated, or credentials refused.
    Auth,
    /// A known command with the wrong number of arguments.
    Arity,
    /// Something a proxy cannot do (replication, a relay inside MULTI…).
    Unsupported,
    /// An argument names what nearcache does not know (a client id).
    Argument,
    /// A client limit (`max_clients`).
    Limit,
    /// A rate limit (`[[limits]]`).
    RateLimited,
    /// No upstream connection could be had.
    UpstreamUnavailable,
    /// Redis did not answer within `command_timeout`.
    UpstreamTimeout,
    /// The upstream connection closed with the request in flight.
    UpstreamLost,
    /// Redis refused the connection setup (password, database).
    UpstreamRejected,
    /// Redis could not set up a connection just then (busy, loading).
    UpstreamBusy,
    /// Redis sent bytes that are not RESP.
    UpstreamInvalid,
    /// Too much already waits for Redis (`upstream.max_in_flight`): not sent.
    UpstreamBacklog,
    /// Refused by `server.deny`, `server.rename` or the user's permissions.
    Denied,
    /// The upstream's circuit breaker is open: refused at once, not sent.
    UpstreamCircuitOpen,
}

impl ErrorKind {
    /// Every kind, in a fixed order (for counters indexed by kind).
    pub const ALL: [ErrorKind; 16] = [
        ErrorKind::Protocol,
        ErrorKind::Auth,
        ErrorKind::Arity,
        ErrorKind::Unsupported,
        ErrorKind::Argument,
        ErrorKind::Limit,
        ErrorKind::RateLimited,
        ErrorKind::UpstreamUnavailable,
        ErrorKind::UpstreamTimeout,
        ErrorKind::UpstreamLost,
        ErrorKind::UpstreamRejected,
        ErrorKind::UpstreamBusy,
        ErrorKind::UpstreamInvalid,
        ErrorKind::UpstreamBacklog,
        ErrorKind::Denied,
        ErrorKind::UpstreamCircuitOpen,
    ];

    /// A short name (`PROXY STATS`, metrics labels).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Protocol => "protocol",
            ErrorKind::Auth => "auth",
            ErrorKind::Arity => "arity",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Argument => "argument",
            ErrorKind::Limit => "limit",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::UpstreamUnavailable => "upstream_unavailable",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
            ErrorKind::UpstreamLost => "upstream_lost",
            ErrorKind::UpstreamRejected => "upstream_rejected",
            ErrorKind::UpstreamBusy => "upstream_busy",
            ErrorKind::UpstreamInvalid => "upstream_invalid",
            ErrorKind::UpstreamBacklog => "upstream_backlog",
            ErrorKind::Denied => "denied",
            ErrorKind::UpstreamCircuitOpen => "upstream_circuit_open",
        }
    }

    /// Its position in [`ErrorKind::ALL`].
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }

    /// Which side failed.
    pub fn side(self) -> Side {
        match self {
            ErrorKind::Protocol
            | ErrorKind::Auth
            | ErrorKind::Arity
            | ErrorKind::Unsupported
            | ErrorKind::Argument
            | ErrorKind::Limit
            | ErrorKind::RateLimited
            | ErrorKind::Denied => Side::Client,
            ErrorKind::UpstreamUnavailable
            | ErrorKind::UpstreamTimeout
            | ErrorKind::UpstreamLost
            | ErrorKind::UpstreamRejected
            | ErrorKind::UpstreamBusy
            | ErrorKind::UpstreamInvalid
            | ErrorKind::UpstreamBacklog
            | ErrorKind::UpstreamCircuitOpen => Side::Upstream,
        }
    }
}

/// Which side of the proxy a failure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client asked for something nearcache will not do.
    Client,
    /// Redis could not be reached or did not answer.
    Upstream,
}

/// An error reply nearcache makes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyError {
    kind: ErrorKind,
    /// The error line without its `-` and CRLF (`ERR …`, `NOAUTH …`).
    text: Cow<'static, str>,
}

impl ProxyError {
    /// An error of `kind` with Redis-style `text` (`ERR …`).
    pub fn new(kind: ErrorKind, text: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            text: text.into(),
        }
    }

    /// `-NOAUTH`, as Redis words it.
    pub fn no_auth() -> Self {
        Self::new(ErrorKind::Auth, "NOAUTH Authentication required.")
    }

    /// A known command with the wrong number of arguments (Redis's wording).
    pub fn wrong_arity(name: &str) -> Self {
        Self::new(
            ErrorKind::Arity,
            format!("ERR wrong number of arguments for '{name}' command"),
        )
    }

    /// Something nearcache cannot do as a proxy.
    pub fn unsupported(text: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Unsupported, text)
    }

    /// Beyond `max_clients`.
    pub fn max_clients() -> Self {
        Self::new(ErrorKind::Limit, "ERR max number of clients reached")
    }

    /// Over the rate limit `name` (described as `label`, "500/s per ip");
    /// the client may retry after `retry`.
    pub fn rate_limited(name: &str, label: &str, retry: std::time::Duration) -> Self {
        // Rounded up, so a retry after it is in time.
        let ms = retry.as_micros().div_ceil(1000).max(1);
        Self::new(
            ErrorKind::RateLimited,
            format!("ERR rate limited by '{name}' ({label}), retry in {ms} ms"),
        )
    }

    /// A command that no rate of `name` can ever let through (its bytes
    /// exceed the burst).
    pub fn over_burst(name: &str, label: &str, burst: u32) -> Self {
        Self::new(
            ErrorKind::RateLimited,
            format!(
                "ERR rate limited by '{name}' ({label}): the command is larger than the burst of {burst}"
            ),
        )
    }

    /// The same refusal of an `EXEC`, as Redis words it: it discards the
    /// transaction (if any) because of the error.
    #[must_use]
    pub fn exec_abort(self) -> Self {
        let text = format!("EXECABORT Transaction discarded because of: {}", self.text);
        Self::new(self.kind, text)
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether the client's connection closes after this reply (as Redis
    /// closes it after a protocol error).
    pub fn closes(&self) -> bool {
        self.kind == ErrorKind::Protocol
    }

    /// The RESP error reply.
    pub fn to_reply(&self) -> Bytes {
        reply::error(&self.text)
    }

    /// `n` copies of the reply, one per command it answers.
    pub fn to_replies(&self, n: usize) -> Bytes {
        let one = self.to_reply();
        if n == 1 {
            return one;
        }
        Bytes::from(one.repeat(n))
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for ProxyError {}

impl From<ProtocolError> for ProxyError {
    fn from(e: ProtocolError) -> Self {
        Self::new(ErrorKind::Protocol, format!("ERR {e}"))
    }
}

impl From<&UpstreamError> for ProxyError {
    fn from(e: &UpstreamError) -> Self {
        let kind = match e {
            UpstreamError::Unavailable(_) => ErrorKind::UpstreamUnavailable,
            UpstreamError::ConnectionLost => ErrorKind::UpstreamLost,
            UpstreamError::Timeout(_) => ErrorKind::UpstreamTimeout,
            UpstreamError::Rejected(_) => ErrorKind::UpstreamRejected,
            UpstreamError::Busy(_) => ErrorKind::UpstreamBusy,
            UpstreamError::InvalidReply => ErrorKind::UpstreamInvalid,
            UpstreamError::Backlog(_) => ErrorKind::UpstreamBacklog,
            UpstreamError::CircuitOpen { .. } => ErrorKind::UpstreamCircuitOpen,
        };
        match e {
            // Redis's own words (`-WRONGPASS …`, `-BUSY …`), as a client
            // would get them directly.
            UpstreamError::Rejected(text) | UpstreamError::Busy(text) => {
                Self::new(kind, text.to_string())
            }
            _ => Self::new(kind, format!("ERR {e}")),
        }
    }
}

impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> Self {
        Self::from(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_indexed_in_order_and_named_once() {
        for (i, kind) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), i);
        }
        let mut names: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorKind::ALL.len());
    }

    #[test]
    fn errors_render_as_redis_words_them_and_know_their_side() {
        let e = ProxyError::wrong_arity("get");
        assert_eq!(
            &e.to_reply()[..],
            b"-ERR wrong number of arguments for 'get' command\r\n"
        );
        assert_eq!(e.kind().side(), Side::Client);
        assert!(!e.closes());
        let lost = ProxyError::from(UpstreamError::ConnectionLost);
        assert_eq!(lost.kind(), ErrorKind::UpstreamLost);
        assert_eq!(lost.kind().side(), Side::Upstream);
        assert_eq!(
            &lost.to_replies(2)[..],
            b"-ERR upstream connection lost\r\n-ERR upstream connection lost\r\n"
        );
        let protocol = ProxyError::from(ProtocolError::InvalidBulkLength);
        assert!(protocol.closes());
        assert_eq!(
            &protocol.to_reply()[..],
            b"-ERR Protocol error: invalid bulk length\r\n"
        );
    }
}
