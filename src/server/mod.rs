//! The client-facing server: listener, accept loop, client limit, and
//! graceful shutdown.
//!
//! [`Proxy::start`] binds and returns at once with the bound address (tests
//! bind port 0); [`Proxy::shutdown`] stops accepting, lets every session finish
//! what it has in flight, and returns when all are done or the deadline passes.

pub(crate) mod client_list;
pub(crate) mod directory;
pub(crate) mod outbox;
pub(crate) mod request;
pub mod route;
pub(crate) mod session;
pub(crate) mod transport;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use arc_swap::ArcSwap;

use crate::cache::{L1, Rules};
use crate::coherence::{Ack, Bus, tracking};
use crate::config::{AuthMode, Config, ConfigError};
use crate::context::{Context, ServerTls, Snapshot};
use crate::error::ProxyError;
use crate::protocol::Protocol;
use crate::reload::Source;
use crate::stats::Stats;
use crate::tls::MaybeTls;
use crate::upstream::{PoolKey, Upstream};
use transport::Peer;

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
    tls_addr: Option<SocketAddr>,
    ctx: Arc<Context>,
    shutdown: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
    admin: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
}

impl Proxy {
    /// Validates `cfg`, binds the listener and starts serving. An unreachable
    /// upstream is not an error (the pool keeps reconnecting, and clients get
    /// `-ERR upstream unavailable` meanwhile); a rejected one is.
    pub async fn start(cfg: Config) -> Result<Proxy, StartError> {
        Self::start_from(cfg, None).await
    }

    /// [`Proxy::start`] for a configuration read from `source`, which
    /// SIGHUP and `PROXY RELOAD` then read again (see [`crate::reload`]).
    pub async fn start_from(cfg: Config, source: Option<Source>) -> Result<Proxy, StartError> {
        crate::tls::install_default_provider();
        cfg.validate("configuration")?;
        let url = cfg.upstream_url()?;
        if url.secure && cfg.upstream.tls.insecure_skip_verify {
            tracing::warn!(
                upstream = %url,
                "upstream.tls.insecure_skip_verify = true: Redis's certificate is NOT verified; \
                 anyone on the path can read and change every command (for tests only)"
            );
        }
        let tls = cfg
            .server
            .tls
            .as_ref()
            .map(|t| {
                crate::tls::server_config(t).map(|config| ServerTls {
                    config: ArcSwap::new(config),
                    handshake_timeout: t.handshake_timeout.0,
                })
            })
            .transpose()
            .map_err(|e| {
                StartError::Config(ConfigError::Invalid {
                    origin: "configuration".into(),
                    errors: vec![crate::config::FieldError {
                        field: e.field().into(),
                        message: e.detail(),
                    }],
                })
            })?;
        let upstream = Upstream::new(url.clone(), cfg.upstream.clone());
        let key = PoolKey {
            user: None,
            db: url.db,
            proto: Protocol::Resp2,
        };
        let default_pool =
            upstream
                .first_pool(key)
                .await
                .map_err(|source| StartError::Upstream {
                    url: url.to_string(),
                    source,
                })?;
        if cfg.server.auth == AuthMode::Redis {
            upstream.close_idle_user_pools(std::time::Duration::from_secs(60));
        }
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
        let tls_listener = if cfg.server.tls_listen.is_empty() {
            None
        } else {
            let bind_error = |source| StartError::Bind {
                addr: cfg.server.tls_listen.clone(),
                source,
            };
            let l = TcpListener::bind(&cfg.server.tls_listen)
                .await
                .map_err(bind_error)?;
            let a = l.local_addr().map_err(bind_error)?;
            Some((l, a))
        };
        // Without a listener of its own, TLS is on the main one.
        let main_tls = tls.is_some() && tls_listener.is_none();
        let tls_addr = match &tls_listener {
            Some((_, a)) => Some(*a),
            None => main_tls.then_some(addr),
        };
        // The admin listener is bound now, so a taken port fails the start;
        // it serves once the context exists.
        let admin_listener = if cfg.admin.listen.is_empty() {
            None
        } else {
            let bind_error = |source| StartError::Bind {
                addr: cfg.admin.listen.clone(),
                source,
            };
            let l = TcpListener::bind(&cfg.admin.listen)
                .await
                .map_err(bind_error)?;
            let a = l.local_addr().map_err(bind_error)?;
            Some((l, a))
        };
        let stats = Arc::new(Stats::new(&cfg));
        let rules = Rules::new(&cfg.cache.rules, &stats);
        let limits = crate::limits::Limits::new(&cfg.limits, &stats, None, 1);
        let l1 = (!rules.caches_nothing()).then(|| L1::new(cfg.cache.max_memory.0));
        let bus = match (&l1, cfg.coherence.nats_url.is_empty()) {
            (Some(l1), false) => Some(
                Bus::start(&cfg.coherence, l1.clone(), stats.bus.clone(), stats.clone()).await?,
            ),
            (None, false) => {
                tracing::warn!(
                    "coherence.nats_url is set but no rule caches anything: the bus is not started"
                );
                None
            }
            (_, true) => None,
        };
        if let (Some(l1), true) = (&l1, cfg.coherence.redis_tracking) {
            tracking::spawn(
                url.clone(),
                rules.cached_prefixes(),
                l1.clone(),
                cfg.upstream.connect_timeout.0,
                stats.tracking.clone(),
            );
        }
        let anonymous_user: Arc<str> = match cfg.server.auth {
            AuthMode::Redis => upstream.url_user().into(),
            AuthMode::Proxy => "default".into(),
        };
        let password = cfg.server.password.clone();
        let (users, fence) = Snapshot::access(&cfg);
        let ctx = Arc::new(Context {
            ack: Ack::new(l1.clone(), bus.clone()),
            l1,
            flights: Arc::default(),
            bus,
            limits: cfg.limits(),
            cfg,
            upstream,
            default_pool,
            directory: Arc::default(),
            stats,
            snapshot: ArcSwap::from_pointee(Snapshot {
                rules,
                password,
                limits,
                users,
                fence,
            }),
            source,
            reloading: tokio::sync::Mutex::new(()),
            anonymous_user,
            tls,
        });
        if let Some(l1) = &ctx.l1 {
            // A restarted, failed-over or restored Redis may not hold what L1
            // does: drop it here and on every peer (whose own connections
            // may not have noticed yet) before the new server serves a read.
            let (l1, bus) = (l1.clone(), ctx.bus.clone());
            ctx.upstream.on_new_identity(Box::new(move |_, _| {
                l1.flush();
                if let Some(bus) = &bus {
                    bus.publish_flush();
                }
            }));
        }
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
        if ctx.l1.is_some() {
            // A pass now (if a rule warms), then after every full flush.
            tokio::spawn(crate::fill::warm::run(Arc::downgrade(&ctx)));
        }
        if ctx.bus.is_some() {
            // Fleet-scoped limits follow the instances the bus sees, at the
            // bus's own cadence.
            let weak = Arc::downgrade(&ctx);
            let every = ctx.cfg.coherence.heartbeat_interval.0;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let Some(ctx) = weak.upgrade() else { break };
                    ctx.snapshot
                        .load()
                        .limits
                        .set_instances(ctx.live_instances());
                }
            });
        }
        let (shutdown, rx) = watch::channel(false);
        let admin = admin_listener.map(|(l, a)| {
            tracing::info!(addr = %a, token = ctx.cfg.admin.token.is_some(), "admin listening");
            let task = tokio::spawn(crate::admin::http::serve(l, ctx.clone(), rx.clone()));
            (a, task)
        });
        let listeners = Listeners {
            main: listener,
            main_tls,
            tls: tls_listener.map(|(l, _)| l),
        };
        let accept = tokio::spawn(accept_loop(listeners, ctx.clone(), rx));
        let snapshot = ctx.snapshot.load();
        tracing::info!(
            %addr,
            upstream = %url,
            rules = snapshot.rules.iter().count(),
            limits = snapshot.limits.iter().count(),
            bus = %if ctx.bus.is_some() {
                crate::config::redact_url(&ctx.cfg.coherence.nats_url)
            } else {
                "off".into()
            },
            redis_tracking = ctx.cfg.coherence.redis_tracking && ctx.l1.is_some(),
            auth = ?ctx.cfg.server.auth,
            tls = ?tls_addr,
            "nearcache listening"
        );
        Ok(Proxy {
            addr,
            tls_addr,
            ctx,
            shutdown,
            accept,
            admin,
        })
    }

    /// Reads the configuration file again and applies what can change
    /// while running (see [`crate::reload`]); logged as `why`.
    pub async fn reload(
        &self,
        why: &str,
    ) -> Result<crate::reload::Reloaded, crate::reload::ReloadError> {
        crate::reload::reload(&self.ctx, why).await
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address TLS clients connect to: `server.tls_listen`'s, or the
    /// main listener's when it speaks TLS; None without `[server.tls]`.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The admin listener's address, if `admin.listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(a, _)| *a)
    }

    /// Stops accepting, lets sessions finish in-flight requests (up to
    /// `server.shutdown_timeout`), then returns. The admin listener serves
    /// until then (`/readyz` says "draining").
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.accept.await;
        if let Some((_, task)) = &self.admin {
            task.abort();
        }
    }
}

/// What clients connect to: `server.listen` (plain, or TLS when
/// `[server.tls]` is set without a `tls_listen`) and `server.tls_listen`.
struct Listeners {
    main: TcpListener,
    main_tls: bool,
    tls: Option<TcpListener>,
}

impl Listeners {
    /// The next connection on either listener, and whether it speaks TLS.
    async fn accept(&self) -> (std::io::Result<(TcpStream, SocketAddr)>, bool) {
        let second = async {
            match &self.tls {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            a = self.main.accept() => (a, self.main_tls),
            a = second => (a, true),
        }
    }
}

/// Makes TLS with a client that connected to a TLS listener, in the
/// client's own task (a slow or hostile client never holds up `accept`),
/// bounded by `handshake_timeout`. A failure ends only this connection: it
/// is counted and logged once, below WARN, as clients cause it.
async fn accept_tls(
    ctx: &Context,
    stream: TcpStream,
    addr: SocketAddr,
) -> Option<MaybeTls<TcpStream>> {
    let tls = ctx.tls.as_ref()?;
    // The configuration of this moment: a reload swaps it for later clients.
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.load_full());
    let counters = &ctx.stats.tls;
    match tokio::time::timeout(tls.handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => {
            counters.ok.fetch_add(1, Ordering::Relaxed);
            Some(MaybeTls::Server(Box::new(stream)))
        }
        Ok(Err(e)) => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer = %addr, error = %e, "TLS handshake failed; client disconnected");
            None
        }
        Err(_) => {
            counters.timeout.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                peer = %addr,
                timeout = ?tls.handshake_timeout,
                "TLS handshake timed out; client disconnected"
            );
            None
        }
    }
}

async fn accept_loop(listeners: Listeners, ctx: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(ctx.cfg.server.max_clients));
    let next_id = AtomicU64::new(1);
    let mut sessions = JoinSet::new();
    loop {
        let (accepted, tls) = tokio::select! {
            a = listeners.accept() => a,
            _ = shutdown.changed() => break,
        };
        // Reap finished sessions so the set does not grow without bound.
        while sessions.try_join_next().is_some() {}
        let (mut stream, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = %addr, "max_clients reached; refusing client");
            ctx.stats.requests.error(crate::error::ErrorKind::Limit, 1);
            if tls {
                // A reply in clear text would mean nothing to a TLS client,
                // and a handshake just to refuse costs what we are short of.
                drop(stream);
                continue;
            }
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = stream
                    .write_all(&ProxyError::max_clients().to_reply())
                    .await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let peer = Peer::of_tcp(&stream, addr);
        let ctx = ctx.clone();
        let rx = shutdown.clone();
        sessions.spawn(async move {
            let stream = if tls {
                match accept_tls(&ctx, stream, addr).await {
                    Some(stream) => stream,
                    None => return,
                }
            } else {
                MaybeTls::Plain(stream)
            };
            session::serve(stream, peer, ctx, id, rx).await;
            drop(permit);
        });
    }
    drop(listeners);
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
