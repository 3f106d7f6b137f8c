//! RESP framing: the bounded parser for client commands, the scanner that
//! splits upstream replies into frames, and the encoding of replies the proxy
//! produces itself.
//!
//! Frames stay bytes: a forwarded command is the client's own bytes, and an
//! upstream reply is Redis's own bytes; nothing on the forwarding path is
//! decoded into a value type.

pub mod parser;
pub mod reply;
pub mod scanner;

pub use parser::{Limits, Parsed, Parser};
pub use reply::{Protocol, Reply};
pub use scanner::ReplyScanner;

/// Offset of the first `\r\n` in `buf` (a lone `\r` is data, not a line end).
#[inline]
pub(crate) fn find_crlf(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = buf[from..].iter().position(|&b| b == b'\r') {
        let at = from + i;
        match buf.get(at + 1) {
            Some(b'\n') => return Some(at),
            Some(_) => from = at + 1,
            None => return None,
        }
    }
    None
}

/// A client sent bytes that are not a valid command. Every variant is final:
/// the client gets the error reply and the connection is closed, as Redis does.
/// The texts match Redis's own, so clients and their tests see no difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// `*` header not a number in range.
    #[error("Protocol error: invalid multibulk length")]
    InvalidMultibulkLength,
    /// `$` header not a number in range.
    #[error("Protocol error: invalid bulk length")]
    InvalidBulkLength,
    /// An array element is not a bulk string (nested arrays included).
    #[error("Protocol error: expected '$', got '{}'", char::from(*.0))]
    ExpectedBulk(u8),
    /// A bulk string is not followed by CRLF.
    #[error("Protocol error: bulk string not terminated by CRLF")]
    BadTerminator,
    /// The `*` line is longer than any valid one.
    #[error("Protocol error: too big mbulk count string")]
    MultibulkHeaderTooLong,
    /// The `$` line is longer than any valid one.
    #[error("Protocol error: too big bulk count string")]
    BulkHeaderTooLong,
    /// An inline command line exceeds the inline limit.
    #[error("Protocol error: too big inline request")]
    InlineTooLong,
    /// An inline command has an unterminated quote.
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    /// One command exceeds the configured request size.
    #[error("Protocol error: request exceeds max_request_bytes")]
    RequestTooLarge,
}

impl ProtocolError {
    /// The RESP error reply for this error.
    pub fn to_reply(self) -> bytes::Bytes {
        crate::error::ProxyError::from(self).to_reply()
    }
}

/// Upstream sent something that is not a RESP reply. Redis never does; this
/// means the connection is broken (or is not talking to Redis) and is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("upstream sent an invalid reply (byte {byte:#04x} at offset {offset})")]
pub struct InvalidReply {
    /// The offending byte.
    pub byte: u8,
    /// Its offset in the unread input.
    pub offset: usize,
}
