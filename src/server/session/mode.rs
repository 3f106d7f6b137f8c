//! The session's modes. Redis keeps some state per connection that only it
//! can keep — a watch, a transaction, subscriptions — so while it lasts the
//! session is pinned to a dedicated upstream connection, and each mode
//! handles commands its own way:
//!
//! | mode | when | how commands go |
//! | --- | --- | --- |
//! | [`Mode::Shared`] | no such state | shared pooled connections; L1 serves reads; a blocking command borrows a dedicated connection for itself |
//! | [`Mode::Pinned`] | after `WATCH` | the pinned connection, replies paired with commands |
//! | [`Mode::Transaction`] | `MULTI` … `EXEC`/`DISCARD` | queued on the pinned connection; what nearcache answers itself is queued too and spliced into `EXEC`'s reply |
//! | [`Mode::Relay`] | `SUBSCRIBE`…, `MONITOR`, `CLIENT TRACKING on` | every frame of the pinned connection relayed as it arrives, until `RESET` |

use bytes::Bytes;

use crate::cache::Invalidation;
use crate::server::directory::Listing;
use crate::server::route::Route;
use crate::upstream::Conn;

/// How the session's commands reach Redis now.
pub(super) enum Mode {
    /// Shared connections.
    Shared,
    /// Pinned by `WATCH`, outside a transaction.
    Pinned(Pin),
    /// Inside `MULTI`.
    Transaction(Pin, Txn),
    /// Every frame of the pinned connection is relayed.
    Relay(Pin, RelayBook),
}

impl Mode {
    /// The dedicated connection, if pinned.
    #[inline]
    pub(super) fn pin(&self) -> Option<&Pin> {
        match self {
            Mode::Shared => None,
            Mode::Pinned(pin) | Mode::Transaction(pin, _) | Mode::Relay(pin, _) => Some(pin),
        }
    }

    /// The dedicated connection, if pinned.
    #[inline]
    pub(super) fn pin_mut(&mut self) -> Option<&mut Pin> {
        match self {
            Mode::Shared => None,
            Mode::Pinned(pin) | Mode::Transaction(pin, _) | Mode::Relay(pin, _) => Some(pin),
        }
    }

    /// True unless the session is on the shared connections.
    #[inline]
    pub(super) fn pinned(&self) -> bool {
        !matches!(self, Mode::Shared)
    }

    /// True inside `MULTI`.
    #[inline]
    pub(super) fn in_transaction(&self) -> bool {
        matches!(self, Mode::Transaction(..))
    }

    /// The pin, leaving the session on the shared connections.
    pub(super) fn unpin(&mut self) -> Option<Pin> {
        match std::mem::replace(self, Mode::Shared) {
            Mode::Shared => None,
            Mode::Pinned(pin) | Mode::Transaction(pin, _) | Mode::Relay(pin, _) => Some(pin),
        }
    }
}

/// A dedicated upstream connection held by the session.
pub(super) struct Pin {
    pub(super) conn: Conn,
    /// The connection's own state no longer matches its pool (SELECT or
    /// HELLO inside the pin, a relay), so it must be closed rather than
    /// reused.
    pub(super) dirty: bool,
    /// This session in the directory of pinned sessions, while pinned.
    pub(super) _listing: Option<Listing>,
}

/// A transaction being queued.
#[derive(Default)]
pub(super) struct Txn {
    /// Keys written inside MULTI, applied at EXEC.
    pub(super) inv: Invalidation,
    /// Commands Redis queued since MULTI.
    pub(super) queued: u32,
    /// Commands nearcache answers itself that Redis would queue: answered
    /// at EXEC, spliced into its reply.
    pub(super) local: Vec<Queued>,
    /// Queued commands that read values Redis stores compressed, by their
    /// place among those Redis queued: decompressed in EXEC's reply.
    pub(super) decode: Vec<(usize, crate::stored::Decode)>,
}

/// A command nearcache answers itself, queued in a transaction.
pub(super) struct Queued {
    /// How many commands Redis queued before it.
    pub(super) after: u32,
    pub(super) route: Route,
    pub(super) argv: Vec<Bytes>,
}

/// A relayed client's writes and what nearcache knows of the replies to
/// them (see `Session::ack_relayed`). Starts afresh with each relay.
#[derive(Default)]
pub(super) struct RelayBook {
    /// Keys written since the last acknowledgement.
    pub(super) inv: Invalidation,
    /// Inside MULTI: its writes wait for EXEC.
    pub(super) multi: bool,
    /// Replies (other than pushes) the relayed commands not yet handed to
    /// the connection draw, for `Op::Ack`'s count.
    pub(super) due: u32,
    /// Every relayed command's replies can be counted (not after MONITOR,
    /// CLIENT REPLY, HELLO, a subscription): writes are then published once
    /// answered, else as they are sent.
    pub(super) countable: bool,
    /// Keys written since a MULTI, published again after EXEC.
    pub(super) txn_inv: Invalidation,
}
