//! The client-facing server: listener, accept loop, client limit, and
//! graceful shutdown.
//!
//! [`Proxy::start`] binds and returns at once with the bound address (tests
//! bind port 0); [`Proxy::shutdown`] stops accepting, lets every session finish
//! what it has in flight, and returns when all are done or the deadline passes.

pub mod client_list;
pub mod directory;
pub mod outbox;
pub mod route;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::config::{Config, ConfigError};
use crate::protocol::{Limits, Protocol};
use crate::upstream::{Pool, PoolKey, Upstream};

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
    pub l1: Option<Arc<crate::cache::L1>>,
    /// The invalidation bus, if `coherence.nats_url` is set (and L1 exists).
    pub bus: Option<Arc<crate::coherence::Bus>>,
    /// Sessions pinned to dedicated connections, by their Redis ids.
    pub directory: Arc<directory::Directory>,
    /// Where acknowledged writes go (L1 again, then the bus).
    pub ack: crate::coherence::Ack,
    /// Redis's own invalidations, if `coherence.redis_tracking` is on.
    pub tracking: Option<Arc<crate::coherence::tracking::Tracking>>,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The coherence bus could not be set up.
    #[error(transparent)]
    Bus(#[from] crate::coherence::BusError),
    /// Redis rejected the connection setup (wrong password, bad database).
    #[error("upstream {url}: {source}")]
    Upstream {
        /// The upstream URL (password hidden).
        url: String,
        /// Why.
        source: crate::upstream::UpstreamError,
    },
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Validates `cfg`, binds the listener and starts serving. An unreachable
    /// upstream is not an error (the pool keeps reconnecting, and clients get
    /// `-ERR upstream unavailable` meanwhile); a rejected one is.
    pub async fn start(cfg: Config) -> Result<Proxy, StartError> {
        cfg.validate("configuration")?;
        let url = cfg.upstream_url()?;
        let upstream = Upstream::new(url.clone(), cfg.upstream.clone());
        let key = PoolKey {
            db: url.db,
            proto: Protocol::Resp2,
        };
        let default_pool = upstream
            .pool(key)
            .await
            .map_err(|source| StartError::Upstream {
                url: url.to_string(),
                source,
            })?;
        let listener = TcpListener::bind(&cfg.server.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: cfg.server.listen.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: cfg.server.listen.clone(),
            source,
        })?;
        let l1 = crate::cache::L1::new(&cfg.cache);
        let bus = match (&l1, cfg.coherence.nats_url.is_empty()) {
            (Some(l1), false) => {
                Some(crate::coherence::Bus::start(&cfg.coherence, l1.clone()).await?)
            }
            (None, false) => {
                tracing::warn!(
                    "coherence.nats_url is set but no rule caches anything: the bus is not started"
                );
                None
            }
            (_, true) => None,
        };
        let tracking = match (&l1, cfg.coherence.redis_tracking) {
            (Some(l1), true) => Some(crate::coherence::tracking::spawn(
                url.clone(),
                l1.cached_prefixes(),
                l1.clone(),
                cfg.upstream.connect_timeout.0,
            )),
            _ => None,
        };
        let ctx = Arc::new(Context {
            ack: crate::coherence::Ack::new(l1.clone(), bus.clone()),
            l1,
            bus,
            limits: cfg.limits(),
            cfg,
            upstream,
            default_pool,
            directory: Arc::default(),
            tracking,
        });
        if let Some(l1) = &ctx.l1 {
            // Hits bypass moka, so its expiry and eviction run on a tick.
            let l1 = Arc::downgrade(l1);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let Some(l1) = l1.upgrade() else { break };
                    l1.maintain();
                }
            });
        }
        let (shutdown, rx) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, ctx, rx));
        tracing::info!(%addr, upstream = %url, "nearcache listening");
        Ok(Proxy {
            addr,
            shutdown,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets sessions finish in-flight requests (up to
    /// `server.shutdown_timeout`), then returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.accept.await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Context>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(ctx.cfg.server.max_clients));
    let next_id = AtomicU64::new(1);
    let mut sessions = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        // Reap finished sessions so the set does not grow without bound.
        while sessions.try_join_next().is_some() {}
        let (mut stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "max_clients reached; refusing client");
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = stream
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let ctx = ctx.clone();
        let rx = shutdown.clone();
        sessions.spawn(async move {
            session::serve(stream, peer, ctx, id, rx).await;
            drop(permit);
        });
    }
    drop(listener);
    let deadline = ctx.cfg.server.shutdown_timeout.0;
    let drained = tokio::time::timeout(deadline, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = sessions.len(),
            "shutdown deadline passed; closing remaining clients"
        );
        sessions.abort_all();
    }
    // Every acknowledged write's invalidation is queued by now.
    if let Some(bus) = &ctx.bus {
        bus.leave(std::time::Duration::from_secs(1)).await;
    }
}
