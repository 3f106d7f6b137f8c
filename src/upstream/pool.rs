//! Upstream pools: per (database, protocol), a few shared pipelined
//! connections and a list of idle dedicated ones.
//!
//! Each shared connection has a supervisor task that connects, waits for the
//! connection to die, and reconnects with exponential backoff and jitter. While
//! no shared connection is up, a request waits for the reconnect it sets off
//! (up to the connect timeout), so a restart or failover shorter than that
//! costs latency, not errors; once the upstream's [circuit
//! breaker](super::breaker) opens, requests fail at once instead of queueing
//! behind a dead server.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis_protocol::resp3::types::OwnedFrame;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::UpstreamError;
use super::backlog::Backlog;
use super::breaker::{Breaker, State};
use super::connection::{self, Conn, ConnOptions, IdleList};
use super::handshake::{self, Identity};
use super::outage::Outages;
use super::probe::Probe;
use crate::config::{RedisUrl, UpstreamConfig};
use crate::protocol::Protocol;

/// Which pool: upstream connections are bound to a database and a protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Selected database.
    pub db: u32,
    /// Reply protocol.
    pub proto: Protocol,
    /// The Redis user its connections authenticate as; None: the URL's.
    pub user: Option<Arc<Credentials>>,
}

/// A Redis user a client authenticated as, where Redis decides on users
/// (`server.auth = "redis"`): its connections authenticate as that user, so
/// Redis's ACL applies to the client's commands unchanged.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    /// The user name.
    pub user: Arc<str>,
    password: Arc<str>,
    /// Its L1 namespace (see `cache::Viewer`): replies filled for one user
    /// are served to that user only.
    pub namespace: u16,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// All pools to one upstream Redis, created on first use.
#[derive(Debug)]
pub struct Upstream {
    /// Where Redis is and who to authenticate as; a reload may change the
    /// password (new connections then use it).
    url: Arc<ArcSwap<RedisUrl>>,
    cfg: UpstreamConfig,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    version: Mutex<String>,
    /// Asks Redis about overdue requests, for every connection.
    probe: Arc<Probe>,
    /// L1 namespaces of the Redis users clients authenticated as (0 is the
    /// URL's identity).
    namespaces: Mutex<HashMap<Arc<str>, u16>>,
    /// Commands and bytes in flight over every connection, and their caps.
    pub backlog: Backlog,
    /// Bumped when the URL's password changes: connections made before
    /// are replaced (shared ones at once, by their supervisors; dedicated
    /// ones when next taken or released; a session's sticky one on its
    /// next send), so a rotated password needs no restart and Redis may
    /// drop the old one.
    epoch: watch::Sender<u64>,
    /// The same, read on every send without the watch's lock.
    epoch_now: AtomicU64,
    /// Outages of the shared connections, for the log and the metrics.
    pub outages: Outages,
    /// Opens after repeated failed connection attempts (see [`super::breaker`]).
    pub breaker: Breaker,
    /// The server the last connection reached, and what to do when a new
    /// one reaches another.
    identity: Mutex<Option<Identity>>,
    on_new_identity: std::sync::OnceLock<HookCell>,
    identity_changes: AtomicU64,
}

/// Called (with the old and the new identity) when a connection reaches a
/// server other than the one before: L1 is flushed here and on every peer
/// before that connection serves anything.
pub type IdentityHook = Box<dyn Fn(&Identity, &Identity) + Send + Sync>;

struct HookCell(IdentityHook);

impl std::fmt::Debug for HookCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityHook")
    }
}

impl Upstream {
    /// An upstream with no connections yet.
    pub fn new(url: RedisUrl, cfg: UpstreamConfig) -> Arc<Self> {
        let url = Arc::new(ArcSwap::from_pointee(url));
        Arc::new(Self {
            probe: Arc::new(Probe::new(url.clone(), cfg.connect_timeout.0)),
            url,
            pools: Mutex::new(HashMap::new()),
            version: Mutex::new(String::new()),
            namespaces: Mutex::new(HashMap::new()),
            epoch: watch::Sender::new(1),
            epoch_now: AtomicU64::new(1),
            outages: Outages::default(),
            breaker: Breaker::new(
                cfg.breaker_failures,
                cfg.breaker_cool_down.0,
                cfg.reconnect_min.0,
            ),
            identity: Mutex::new(None),
            on_new_identity: std::sync::OnceLock::new(),
            identity_changes: AtomicU64::new(0),
            backlog: Backlog::new(
                cfg.max_in_flight,
                cfg.max_in_flight_bytes.as_usize(),
                cfg.command_timeout.0,
            ),
            cfg,
        })
    }

    /// Credentials for `user` with `password`, with the user's L1 namespace
    /// (the same for every client of that user). Users beyond 65 534 share
    /// the last namespace: replies are then shared among them, which only a
    /// deployment with that many Redis users could notice.
    pub fn credentials(&self, user: &[u8], password: &[u8]) -> Arc<Credentials> {
        let user: Arc<str> = String::from_utf8_lossy(user).into();
        let mut namespaces = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
        let next = u16::try_from(namespaces.len() + 1).unwrap_or(u16::MAX);
        let namespace = *namespaces.entry(user.clone()).or_insert(next);
        Arc::new(Credentials {
            user,
            password: String::from_utf8_lossy(password).into(),
            namespace,
        })
    }

    /// Whether `user` is a Redis user some client authenticated as, or the
    /// URL's.
    pub fn knows_user(&self, user: &[u8]) -> bool {
        let url = self.url.load();
        let url_user = url.username.as_deref().unwrap_or("default");
        let namespaces = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
        user == url_user.as_bytes() || namespaces.keys().any(|u| u.as_bytes() == user)
    }

    /// The user the URL's connections run as.
    pub fn url_user(&self) -> String {
        self.url
            .load()
            .username
            .clone()
            .unwrap_or_else(|| "default".into())
    }

    /// Authenticates new connections with `password` (a reload's rotated
    /// one; the address and user stay what they were).
    pub fn set_password(&self, password: Option<String>) {
        let mut next = RedisUrl::clone(&self.url.load());
        if next.password == password {
            return;
        }
        next.password = password;
        self.url.store(Arc::new(next));
        self.renew_connections();
    }

    /// Makes every connection made so far one to replace (shared ones at
    /// once, the others when next used); returns the new epoch.
    fn renew_connections(&self) -> u64 {
        let epoch = self.epoch_now.fetch_add(1, Ordering::AcqRel) + 1;
        self.epoch.send_replace(epoch);
        epoch
    }

    /// Sets what happens when the upstream turns out to be another server
    /// (once; later calls are ignored).
    pub fn on_new_identity(&self, hook: IdentityHook) {
        let _ = self.on_new_identity.set(HookCell(hook));
    }

    /// The identity of the server the last connection reached (None before
    /// any, or when `INFO` is not allowed).
    pub fn identity(&self) -> Option<Identity> {
        self.identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many times a connection reached another server than the one
    /// before (restarts, failovers).
    pub fn identity_changes(&self) -> u64 {
        self.identity_changes.load(Ordering::Relaxed)
    }

    /// Notes the server a new connection reached. When it is another one,
    /// runs the hook (under the lock, so no second connection to the new
    /// server is handed out before L1 is flushed) and renews every older
    /// connection, which may still reach the old server (a failover whose
    /// old master lives on). Returns the new epoch then.
    fn observe(&self, seen: &Option<Identity>) -> Option<u64> {
        let seen = seen.as_ref()?;
        let mut known = self.identity.lock().unwrap_or_else(|e| e.into_inner());
        let old = match known.as_ref() {
            None => {
                *known = Some(seen.clone());
                return None;
            }
            Some(old) if old == seen => return None,
            Some(old) => old.clone(),
        };
        self.identity_changes.fetch_add(1, Ordering::Relaxed);
        tracing::info!(old = %old, new = %seen, "the upstream is another server now (restart, failover or restore): L1 flushed here and on every peer");
        if let Some(HookCell(hook)) = self.on_new_identity.get() {
            hook(&old, seen);
        }
        *known = Some(seen.clone());
        Some(self.renew_connections())
    }

    /// Whether `conn` was made with the credentials in use now.
    #[inline]
    pub fn is_current(&self, conn: &Conn) -> bool {
        conn.epoch() == self.epoch_now.load(Ordering::Acquire)
    }

    /// The refusal while the circuit is open, if it is.
    pub fn circuit_open(&self) -> Option<UpstreamError> {
        match self.breaker.state() {
            State::Open(retry_in) => Some(UpstreamError::CircuitOpen {
                cause: self.breaker.cause().into(),
                retry_in,
            }),
            _ => None,
        }
    }

    /// The URL new connections use.
    pub fn url(&self) -> Arc<RedisUrl> {
        self.url.load_full()
    }

    /// The database a client starts in (the URL's `/db`).
    pub fn default_db(&self) -> u32 {
        self.url.load().db
    }

    /// The upstream's version as its last HELLO reported it ("" before any).
    pub fn server_version(&self) -> String {
        self.version.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The pool for `key`, created (and its first connection tried) on first
    /// use. Fails when Redis refuses the setup itself (e.g. `SELECT 99` on a
    /// server with 16 databases), or cannot set it up just now (`-BUSY`
    /// running a script: the client's `SELECT` gets that, as it would
    /// directly); an unreachable server still yields a pool, which keeps
    /// reconnecting.
    pub async fn pool(self: &Arc<Self>, key: PoolKey) -> Result<Arc<Pool>, UpstreamError> {
        self.pool_unless(key, |e| {
            matches!(e, UpstreamError::Rejected(_) | UpstreamError::Busy(_))
        })
        .await
    }

    /// Redis's answer to a client's `AUTH <args>`, asked on a new
    /// connection of its own (so no shared one changes user): `Ok` for
    /// `+OK`, else Redis's own error line (`-WRONGPASS …`, or for `AUTH
    /// <password>` against a `default` without one, its `-ERR AUTH …`).
    pub async fn check_auth(&self, args: &[&[u8]]) -> Result<(), UpstreamError> {
        let timeout = self.cfg.connect_timeout.0;
        let ask = async {
            let url = self.url.load_full();
            let h = handshake::connect(&url, 0, Protocol::Resp2, timeout).await?;
            let (mut stream, mut buf) = (h.stream, h.leftover);
            let mut cmd: Vec<&[u8]> = vec![b"AUTH"];
            cmd.extend_from_slice(args);
            stream
                .write_all(&super::encode_command(&cmd))
                .await
                .map_err(|_| UpstreamError::ConnectionLost)?;
            match handshake::read_frame(&mut stream, &mut buf, &url.addr()).await? {
                OwnedFrame::SimpleString { .. } => Ok(()),
                OwnedFrame::SimpleError { data, .. } => Err(UpstreamError::Rejected(data.into())),
                _ => Err(UpstreamError::InvalidReply),
            }
        };
        tokio::time::timeout(timeout, ask)
            .await
            .unwrap_or(Err(UpstreamError::Timeout(timeout)))
    }

    /// Closes, every `every`, the pools of Redis users no client uses any
    /// more (the pools of `upstream.url`'s user stay).
    pub fn close_idle_user_pools(self: &Arc<Self>, every: Duration) {
        let upstream = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(upstream) = upstream.upgrade() else {
                    break;
                };
                // (Only the map holds it: no session is on it.)
                upstream
                    .lock_pools()
                    .retain(|key, pool| key.user.is_none() || Arc::strong_count(pool) > 1);
            }
        });
    }

    /// The pool clients start on, at start-up: as [`Upstream::pool`], but a
    /// Redis busy or loading then still yields the pool (nearcache starts
    /// while Redis cannot serve, and serves once it can).
    pub async fn first_pool(self: &Arc<Self>, key: PoolKey) -> Result<Arc<Pool>, UpstreamError> {
        self.pool_unless(key, |e| matches!(e, UpstreamError::Rejected(_)))
            .await
    }

    async fn pool_unless(
        self: &Arc<Self>,
        key: PoolKey,
        fatal: impl Fn(&UpstreamError) -> bool,
    ) -> Result<Arc<Pool>, UpstreamError> {
        if let Some(pool) = self.lock_pools().get(&key) {
            return Ok(pool.clone());
        }
        let idle = Arc::new(IdleList::new(self.cfg.max_idle_dedicated));
        // One handshake first, so a rejected database is reported to the client
        // that asked for it instead of becoming a pool that retries forever.
        // The connection is kept as the pool's first idle dedicated one.
        match self
            .connect(key.clone(), self.dedicated_options(&idle))
            .await
        {
            Ok(conn) => idle.put(conn),
            Err(e) if fatal(&e) => return Err(e),
            Err(_) => {}
        }
        let mut pools = self.lock_pools();
        if let Some(pool) = pools.get(&key) {
            return Ok(pool.clone());
        }
        let pool = Arc::new(Pool::start(self.clone(), key.clone(), idle));
        pool.warm();
        pools.insert(key, pool.clone());
        Ok(pool)
    }

    fn dedicated_options(&self, idle: &Arc<IdleList>) -> ConnOptions {
        ConnOptions {
            command_timeout: self.cfg.command_timeout.0,
            probe: Some(self.probe.clone()),
            idle: Some(idle.clone()),
            max_in_flight: self.cfg.max_in_flight_per_connection,
        }
    }

    fn lock_pools(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Arc<Pool>>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens one connection for `key` and starts its task.
    async fn connect(&self, key: PoolKey, opts: ConnOptions) -> Result<Conn, UpstreamError> {
        // Read before the handshake: a password rotated meanwhile makes
        // this connection one to replace.
        let epoch = self.epoch_now.load(Ordering::Acquire);
        let as_user = key.user.as_ref().map(|c| (&c.user[..], &c.password[..]));
        let h = match handshake::connect_as(
            &self.url.load_full(),
            as_user,
            key.db,
            key.proto,
            self.cfg.connect_timeout.0,
        )
        .await
        {
            Ok(h) => h,
            Err(e) => {
                if e.is_outage() {
                    self.breaker.failure(&e.cause());
                }
                return Err(e);
            }
        };
        self.breaker.success();
        if !h.server_version.is_empty() {
            if let Ok(mut v) = self.version.lock() {
                v.clone_from(&h.server_version);
            }
        }
        // A connection to a server other than before: it is the first of
        // the new generation, not one to replace (unless the password also
        // rotated during its handshake).
        let epoch = match self.observe(&h.identity) {
            Some(renewed) if renewed == epoch + 1 => renewed,
            _ => epoch,
        };
        Ok(connection::spawn(
            h.stream,
            h.leftover,
            opts,
            h.client_id,
            epoch,
        ))
    }
}

/// State of one shared connection slot.
#[derive(Debug, Clone)]
enum SlotState {
    Connecting,
    Up(Conn),
    Down(UpstreamError),
}

/// The connections for one (database, protocol).
#[derive(Debug)]
pub struct Pool {
    upstream: Arc<Upstream>,
    key: PoolKey,
    slots: Vec<watch::Receiver<SlotState>>,
    next: AtomicUsize,
    idle: Arc<IdleList>,
    supervisors: Vec<JoinHandle<()>>,
    /// Cuts the supervisors' backoff short: a request finding every slot
    /// down means someone wants Redis now, and it may be back.
    wake: Arc<Notify>,
    /// Woken by the supervisors at every change of a slot's state (for
    /// requests waiting on a connection).
    changed: Arc<Notify>,
    /// Dedicated connections being opened to keep the idle list warm.
    warming: Arc<AtomicUsize>,
}

impl Pool {
    fn start(upstream: Arc<Upstream>, key: PoolKey, idle: Arc<IdleList>) -> Self {
        let mut slots = Vec::new();
        let mut supervisors = Vec::new();
        let wake = Arc::new(Notify::new());
        let changed = Arc::new(Notify::new());
        // The shared connections, then as many for scripts.
        for _ in 0..upstream.cfg.pool_size * 2 {
            let (tx, rx) = watch::channel(SlotState::Connecting);
            supervisors.push(tokio::spawn(supervise(
                upstream.clone(),
                key.clone(),
                Slot {
                    state: tx,
                    changed: changed.clone(),
                },
                wake.clone(),
            )));
            slots.push(rx);
        }
        Self {
            upstream,
            key,
            slots,
            next: AtomicUsize::new(0),
            idle,
            supervisors,
            wake,
            changed,
            warming: Arc::default(),
        }
    }

    /// This pool's database and protocol.
    pub fn key(&self) -> &PoolKey {
        &self.key
    }

    /// Whether a shared connection is up now (for readiness; never waits).
    pub fn any_shared_up(&self) -> bool {
        self.slots[..self.slots.len() / 2]
            .iter()
            .any(|slot| matches!(&*slot.borrow(), SlotState::Up(conn) if !conn.is_closed()))
    }

    /// A live shared connection (round-robin). While none is up, waits for
    /// the reconnect this sets off, until the outage is a connect timeout
    /// old, unless the circuit is open (then fails at once).
    pub async fn shared(&self) -> Result<Conn, UpstreamError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        self.pick(&self.slots[..self.slots.len() / 2], start).await
    }

    /// One of the pool's connections for scripts and functions (`EVAL`,
    /// `FCALL`…), as many as the shared ones and shared by every client's
    /// scripts alike: a script that runs long then holds up only the scripts
    /// behind it (Redis, which runs one at a time, would answer them
    /// `-BUSY`), never the other commands, which get Redis's `-BUSY`, and
    /// `SCRIPT KILL` reaches it. While they are down, a shared one.
    pub async fn scripts(&self) -> Result<Conn, UpstreamError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // (Both waits end with the outage's first connect timeout: no
        // double wait.)
        match self.pick(&self.slots[self.slots.len() / 2..], start).await {
            Ok(conn) => Ok(conn),
            Err(_) => self.shared().await,
        }
    }

    /// A live connection of `slots`, round-robin from `start`, waited for
    /// as [`Pool::shared`] says.
    async fn pick(
        &self,
        slots: &[watch::Receiver<SlotState>],
        start: usize,
    ) -> Result<Conn, UpstreamError> {
        let n = slots.len();
        for i in 0..n {
            if let SlotState::Up(conn) = &*slots[(start + i) % n].borrow() {
                if !conn.is_closed() {
                    return Ok(conn.clone());
                }
            }
        }
        // None is up: the slow path, which a live connection never takes.
        let breaker = &self.upstream.breaker;
        let limit = self.upstream.cfg.connect_timeout.0;
        // Requests wait within the first connect timeout of an outage, not
        // each for its own: past it, a pipeline behind a dead server fails
        // fast instead of waiting a timeout per command.
        let began = self
            .upstream
            .outages
            .since()
            .unwrap_or_else(std::time::Instant::now);
        let deadline = tokio::time::Instant::from_std(began + limit);
        loop {
            // Registered before the states are read, so no change between
            // the two is missed.
            let slot_changed = self.changed.notified();
            let circuit_changed = breaker.changed();
            tokio::pin!(slot_changed, circuit_changed);
            slot_changed.as_mut().enable();
            circuit_changed.as_mut().enable();
            let mut last_error: Option<UpstreamError> = None;
            for i in 0..n {
                match &*slots[(start + i) % n].borrow() {
                    SlotState::Up(conn) if !conn.is_closed() => return Ok(conn.clone()),
                    SlotState::Down(e) => last_error = Some(e.clone()),
                    SlotState::Up(_) | SlotState::Connecting => {}
                }
            }
            if let Some(refusal) = self.upstream.circuit_open() {
                return Err(refusal);
            }
            let unavailable = || {
                last_error.clone().unwrap_or_else(|| {
                    UpstreamError::Unavailable(
                        format!("no connection within {limit:?} (still connecting)").into(),
                    )
                })
            };
            // Someone wants Redis now: the supervisors try at once.
            self.wake.notify_waiters();
            if tokio::time::Instant::now() >= deadline {
                return Err(unavailable());
            }
            let changed = async {
                tokio::select! {
                    _ = slot_changed => {}
                    _ = circuit_changed => {}
                }
            };
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(unavailable());
            }
        }
    }

    /// A dedicated connection for a stateful client (transaction, blocking
    /// command, pub/sub): an idle one or a new one. Release it with
    /// [`Op::Release`](super::Op::Release) when its state is clean, or drop
    /// every handle to close it.
    pub async fn dedicated(&self) -> Result<Conn, UpstreamError> {
        let mut taken = self.idle.take();
        // Connections made with a password rotated since are closed, not
        // reused.
        while taken.as_ref().is_some_and(|c| !self.upstream.is_current(c)) {
            taken = self.idle.take();
        }
        self.warm();
        match taken {
            Some(conn) => Ok(conn),
            None => {
                if let Some(refusal) = self.upstream.circuit_open() {
                    return Err(refusal);
                }
                self.upstream
                    .connect(
                        self.key.clone(),
                        self.upstream.dedicated_options(&self.idle),
                    )
                    .await
            }
        }
    }

    /// Tops the idle list up to `min_idle_dedicated`, in the background.
    fn warm(&self) {
        let want = self.upstream.cfg.min_idle_dedicated;
        let opening = self.warming.load(Ordering::Relaxed);
        let missing = want.saturating_sub(self.idle.len() + opening);
        for _ in 0..missing {
            self.warming.fetch_add(1, Ordering::Relaxed);
            let (upstream, key, idle, warming) = (
                self.upstream.clone(),
                self.key.clone(),
                self.idle.clone(),
                self.warming.clone(),
            );
            tokio::spawn(async move {
                let db = key.db;
                match upstream
                    .connect(key, upstream.dedicated_options(&idle))
                    .await
                {
                    Ok(conn) => idle.put(conn),
                    Err(e) => {
                        tracing::debug!(db, error = %e, "warming a dedicated connection failed")
                    }
                }
                warming.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for s in &self.supervisors {
            s.abort();
        }
    }
}

/// One shared slot's state, and who to tell when it changes.
struct Slot {
    state: watch::Sender<SlotState>,
    changed: Arc<Notify>,
}

impl Slot {
    fn set(&self, state: SlotState) {
        self.state.send_replace(state);
        self.changed.notify_waiters();
    }
}

/// Keeps one shared slot connected for the life of the pool.
async fn supervise(upstream: Arc<Upstream>, key: PoolKey, slot: Slot, wake: Arc<Notify>) {
    let min = upstream.cfg.reconnect_min.0;
    let max = upstream.cfg.reconnect_max.0;
    let mut delay = min;
    let opts = ConnOptions {
        command_timeout: upstream.cfg.command_timeout.0,
        probe: Some(upstream.probe.clone()),
        idle: None,
        max_in_flight: upstream.cfg.max_in_flight_per_connection,
    };
    loop {
        match upstream.connect(key.clone(), opts.clone()).await {
            Ok(conn) => {
                match upstream.outages.end() {
                    Some(after) => tracing::info!(db = key.db, after = ?after, "upstream back"),
                    None => {
                        tracing::debug!(db = key.db, proto = ?key.proto, "upstream connection up")
                    }
                }
                slot.set(SlotState::Up(conn.clone()));
                delay = min;
                let mut conn = conn;
                let mut epoch = upstream.epoch.subscribe();
                loop {
                    tokio::select! {
                        _ = conn.closed() => break,
                        changed = epoch.changed() => {
                            if changed.is_err() || upstream.is_current(&conn) {
                                continue;
                            }
                            // The password rotated: the new connection
                            // takes the slot before the old one goes, so no
                            // request finds the slot empty; the old one
                            // closes once the sessions still on it move
                            // (their next send) and its replies are in.
                            match upstream.connect(key.clone(), opts.clone()).await {
                                Ok(fresh) => {
                                    tracing::info!(db = key.db, "upstream connection renewed with the rotated credentials");
                                    slot.set(SlotState::Up(fresh.clone()));
                                    conn = fresh;
                                }
                                Err(e) => tracing::warn!(db = key.db, error = %e, "renewing an upstream connection with the rotated credentials failed; keeping the old one"),
                            }
                        }
                    }
                }
                if upstream.outages.begin() {
                    tracing::warn!(db = key.db, "upstream connection lost; reconnecting");
                } else {
                    tracing::debug!(db = key.db, "upstream connection lost; reconnecting");
                }
                slot.set(SlotState::Connecting);
                // Reconnect at once the first time: a lost connection is often
                // a single event (a killed client, a failover), not an outage.
                continue;
            }
            Err(e) => {
                // One line per outage; each retry is DEBUG.
                if upstream.outages.begin() {
                    tracing::warn!(db = key.db, error = %e, "upstream connect failed; retrying until it is back");
                } else {
                    tracing::debug!(db = key.db, error = %e, retry_in = ?delay, "upstream connect failed");
                }
                slot.set(SlotState::Down(e));
                let wait = jitter(delay);
                delay = (delay * 2).min(max);
                // While the circuit is open, the next attempt is the
                // half-open one, when the cool-down ends; requests do not
                // wake it (they are refused meanwhile).
                if let State::Open(left) = upstream.breaker.state() {
                    tokio::time::sleep(left).await;
                    continue;
                }
                // Back off, but try at once when a request wants Redis
                // (after a short floor, so a flood of requests during an
                // outage is not a flood of connection attempts): service
                // resumes the moment Redis can serve.
                let floor = WAKE_FLOOR.min(wait);
                tokio::time::sleep(floor).await;
                tokio::select! {
                    _ = tokio::time::sleep(wait - floor) => {}
                    _ = wake.notified() => {}
                }
            }
        }
    }
}

/// The least time between a slot's connection attempts, however often
/// requests ask for one.
const WAKE_FLOOR: Duration = Duration::from_millis(50);

/// `d` ± 25 %, so that many proxies do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let r = RandomState::new().build_hasher().finish();
    let frac = (r % 1000) as f64 / 1000.0; // 0.0..1.0
    d.mul_f64(0.75 + frac * 0.5)
}
