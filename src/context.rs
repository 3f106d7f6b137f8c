//! What every session shares: the configuration, the upstream, L1, the bus,
//! the directory of clients, the stats registry, and the snapshot of what a
//! reload may swap (the rules, the limits, the password, the users, the fence).
//!
//! It sits apart from `server` so that `admin` (which reads it) and the
//! request path (which calls `admin`) do not import each other.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::cache::{L1, Rules};
use crate::coherence::{Ack, Bus};
use crate::config::Config;
use crate::fill::Flights;
use crate::protocol::Limits;
use crate::server::directory::Directory;
use crate::stats::Stats;
use crate::upstream::{Pool, Upstream};

/// What a reload may swap as a whole: a session takes the current one at
/// each batch of input, and a fill in flight keeps the rule fields it copied
/// when it started.
#[derive(Debug)]
pub struct Snapshot {
    /// The key rules, in match order.
    pub rules: Rules,
    /// `server.password`: what clients must `AUTH` with, if anything.
    pub password: Option<String>,
    /// The rate limits.
    pub limits: crate::limits::Limits,
    /// `[[users]]`: who clients may authenticate as, and what each may run.
    pub users: crate::acl::Users,
    /// `server.deny` and `server.rename`.
    pub fence: crate::acl::Fence,
}

impl Snapshot {
    /// The users and the fence of a validated configuration. (Validation
    /// has already refused what would fail here; should it not have, the
    /// failure is closed: no user, nothing fenced open.)
    pub fn access(cfg: &Config) -> (crate::acl::Users, crate::acl::Fence) {
        let users = crate::acl::Users::new(cfg.server.password.as_deref(), &cfg.users)
            .unwrap_or_else(|e| {
                tracing::error!("{e}");
                crate::acl::Users::closed()
            });
        let fence = crate::acl::Fence::new(&cfg.server.deny, &cfg.server.rename).unwrap_or_else(
            |(field, message)| {
                tracing::error!("{field}: {message}");
                crate::acl::Fence::closed()
            },
        );
        (users, fence)
    }

    /// Whether a new client may run commands before `AUTH`.
    pub fn open(&self) -> bool {
        if self.users.enforced {
            self.users.open()
        } else {
            self.password.is_none()
        }
    }
}

/// What every session shares.
#[derive(Debug)]
pub struct Context {
    /// The validated configuration.
    pub cfg: Config,
    /// Client input limits, from `cfg`.
    pub limits: Limits,
    /// The upstream Redis.
    pub upstream: Arc<Upstream>,
    /// The pool new clients start on (the URL's database, RESP2).
    pub default_pool: Arc<Pool>,
    /// The L1 cache, if any rule caches.
    pub l1: Option<Arc<L1>>,
    /// Fetches in flight, shared by every session's misses.
    pub flights: Arc<Flights>,
    /// The invalidation bus, if `coherence.nats_url` is set (and L1 exists).
    pub bus: Option<Arc<Bus>>,
    /// Where acknowledged writes go (L1 again, then the bus).
    pub ack: Ack,
    /// nearcache's clients, for `CLIENT LIST`, `KILL` and id translation.
    pub directory: Arc<Directory>,
    /// Every counter.
    pub stats: Arc<Stats>,
    /// What a reload swaps.
    pub snapshot: ArcSwap<Snapshot>,
    /// Where the configuration came from, for a reload (None: built in, or
    /// given by a test).
    pub source: Option<crate::reload::Source>,
    /// Reloads one at a time.
    pub reloading: tokio::sync::Mutex<()>,
    /// The user clients that did not authenticate as a Redis user run as,
    /// as `CLIENT LIST` names it: `upstream.url`'s where Redis decides on
    /// users, else `default`.
    pub anonymous_user: Arc<str>,
    /// Client TLS, if `[server.tls]` is set.
    pub tls: Option<ServerTls>,
}

/// Client TLS: the server configuration a reload swaps (certificates
/// rotate; a handshake in progress keeps the one it started with), and how
/// long a handshake may take.
#[derive(Debug)]
pub struct ServerTls {
    /// The configuration new handshakes use.
    pub config: ArcSwap<rustls::ServerConfig>,
    /// `server.tls.handshake_timeout`.
    pub handshake_timeout: std::time::Duration,
}

impl Context {
    /// Instances alive on the coherence bus, this one included (1 without
    /// a bus).
    pub fn live_instances(&self) -> u32 {
        if self.bus.is_none() {
            return 1;
        }
        let peers = self
            .stats
            .bus
            .live_peers
            .load(std::sync::atomic::Ordering::Relaxed);
        u32::try_from(peers).unwrap_or(u32::MAX - 1) + 1
    }
}
