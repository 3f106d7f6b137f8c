//! Configuration: the TOML file, environment overrides and command-line flags,
//! merged in that order (flags win), then validated with messages that name the
//! file and the field.
//!
//! Every option and its default lives here, in the `Default` impls; the
//! shipped `config.toml` documents the same values and a test keeps the two in
//! step.

mod limits;
mod units;
mod upstream_url;
mod validate;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use limits::{Action, Counts, LimitConfig, Per, Rate, Scope};
pub use units::{ByteSize, Duration};
pub use upstream_url::{RedisUrl, redact_url, split_credentials};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The client-facing side.
    pub server: ServerConfig,
    /// The Redis behind the proxy.
    pub upstream: UpstreamConfig,
    /// The in-process L1 cache and its key-prefix rules.
    pub cache: CacheConfig,
    /// Metrics and health endpoints (HTTP).
    pub admin: AdminConfig,
    /// Invalidation bus between instances.
    pub coherence: CoherenceConfig,
    /// Rate limits at admission (`[[limits]]`).
    pub limits: Vec<LimitConfig>,
    /// Users nearcache authenticates and checks itself (`[[users]]`).
    pub users: Vec<UserConfig>,
}

/// One user nearcache checks itself (`[[users]]`): its credentials and what
/// it may run, in a subset of Redis's ACL syntax.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserConfig {
    /// The name clients `AUTH` as (`default`: the user of clients that do
    /// not authenticate).
    pub name: String,
    /// SHA-256 of each accepted password, in hex (as Redis's `#<hash>`;
    /// `nearcache hash-password` prints one).
    pub passwords: Vec<String>,
    /// Any password (or none, for `default`) is accepted.
    pub nopass: bool,
    /// A disabled user cannot authenticate.
    pub enabled: bool,
    /// Commands, left to right: `+@read -@dangerous +info -config|set`,
    /// `allcommands`, `nocommands`. Nothing by default.
    pub commands: String,
    /// Key patterns: `~ticker:*` (read and write), `%R~candles:*`,
    /// `%W~signal:*`, `allkeys`, `resetkeys`. None by default.
    pub keys: String,
    /// Pub/Sub channel patterns: `&prices:*`, `allchannels`,
    /// `resetchannels`. None by default.
    pub channels: String,
    /// May run `PROXY …` and the `ACL` subcommands that change users.
    pub admin: bool,
}

impl Default for UserConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            passwords: Vec::new(),
            nopass: false,
            enabled: true,
            commands: String::new(),
            keys: String::new(),
            channels: String::new(),
            admin: false,
        }
    }
}

/// The client-facing side: listener, limits, client authentication.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to accept clients on.
    pub listen: String,
    /// Worker threads; 1 (default) = a single-threaded runtime; 0 = one per
    /// available core.
    pub threads: usize,
    /// Clients beyond this many are refused with an error.
    pub max_clients: usize,
    /// Close a client connection idle this long (0 = never, as Redis's `timeout 0`).
    pub idle_timeout: Duration,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    pub shutdown_timeout: Duration,
    /// If set, clients must `AUTH <password>` (or `HELLO … AUTH default <password>`)
    /// before anything else. Checked by the proxy; unrelated to the upstream password.
    pub password: Option<String>,
    /// Who checks clients' credentials: nearcache (`password` above), or
    /// Redis, for its own ACL users.
    pub auth: AuthMode,
    /// Largest number of arguments in one command.
    pub max_args: usize,
    /// Largest single argument.
    pub max_bulk_bytes: ByteSize,
    /// Largest whole command.
    pub max_request_bytes: ByteSize,
    /// Largest inline (telnet-style) command line.
    pub max_inline_bytes: ByteSize,
    /// Replies a client may have outstanding before the proxy stops reading its
    /// pipeline (backpressure against clients that never read).
    pub max_pending_replies: usize,
    /// As Redis's `protected-mode`: refuse to start with a listener on a
    /// non-loopback address that nothing guards (clients: no password, users
    /// or client TLS; admin: no token). `false` lets it, knowingly.
    pub protected_mode: bool,
    /// Commands refused to every client (`flushall`, `config`,
    /// `client|kill`), before anything is sent.
    pub deny: Vec<String>,
    /// Commands renamed, as Redis's `rename-command`: `{ config = "cfg-x" }`
    /// makes `CONFIG` unknown and `CFG-X` run it; `""` only hides it.
    pub rename: std::collections::BTreeMap<String, String>,
    /// A second listener, for TLS clients, beside the plain `listen` (as
    /// Redis's `tls-port` beside `port`); needs `[server.tls]`. Empty (the
    /// default) with `[server.tls]` set: `listen` itself speaks TLS.
    pub tls_listen: String,
    /// TLS for clients; unset (the default) = plain TCP only.
    pub tls: Option<ServerTlsConfig>,
}

/// `[server.tls]`: the certificate clients see, and whether they must show
/// one of their own. The files are read at start and again on every reload,
/// so a certificate rotates with no connection dropped.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// The certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates (PEM) client certificates are verified against
    /// (mutual TLS); unset = clients show none.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: `required` (default: a client without a
    /// certificate the CA signed is refused) or `optional` (one it shows
    /// must verify, but it may show none).
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// A client that has not finished its handshake this long after
    /// connecting is disconnected.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Duration,
}

impl ServerTlsConfig {
    /// Whether clients must show a certificate (`client_auth`, defaulting to
    /// `required` when `client_ca_file` is set).
    pub fn client_auth(&self) -> ClientAuth {
        self.client_auth.unwrap_or(ClientAuth::Required)
    }

    /// Whether this alone keeps strangers out: every client must show a
    /// certificate the configured CA signed.
    pub fn authenticates_clients(&self) -> bool {
        self.client_ca_file.is_some() && self.client_auth() == ClientAuth::Required
    }
}

fn default_handshake_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(10))
}

/// Whether TLS clients must show a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuth {
    /// Every client must show one the client CA signed.
    Required,
    /// A client may show none; one it shows must verify.
    Optional,
}

/// `[upstream.tls]`: how a `rediss://` upstream is verified, and the
/// certificate nearcache shows it (mutual TLS). Read at start; a reload
/// that changes it says it takes a restart.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// CA certificates (PEM) Redis's certificate is verified against;
    /// unset = the system's trusted CAs.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for a Redis that verifies its clients
    /// (`tls-auth-clients yes`); goes with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key_file: Option<PathBuf>,
    /// The name Redis's certificate must carry, also sent as SNI; unset =
    /// the URL's host.
    pub server_name: Option<String>,
    /// DANGEROUS, tests only: accept any certificate Redis shows, so anyone
    /// on the path can read and change every command. Logged as a warning
    /// at start.
    pub insecure_skip_verify: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:6380".into(),
            threads: 1,
            max_clients: 10_000,
            idle_timeout: Duration::default(),
            shutdown_timeout: Duration(std::time::Duration::from_secs(10)),
            password: None,
            auth: AuthMode::Proxy,
            max_args: 1024 * 1024,
            max_bulk_bytes: ByteSize(512 << 20),
            max_request_bytes: ByteSize(512 << 20),
            max_inline_bytes: ByteSize(64 << 10),
            max_pending_replies: 1024,
            protected_mode: true,
            deny: Vec::new(),
            rename: std::collections::BTreeMap::new(),
            tls_listen: String::new(),
            tls: None,
        }
    }
}

/// The upstream Redis.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://…` for TLS
    /// (see `[upstream.tls]`).
    pub url: String,
    /// Shared, pipelined connections per (database, protocol) in use.
    pub pool_size: usize,
    /// Idle dedicated connections kept per (database, protocol) for
    /// transactions and blocking commands.
    pub max_idle_dedicated: usize,
    /// Dedicated connections kept open and idle, ready, per (database,
    /// protocol) in use: a client that needs one (MULTI, a blocking command,
    /// a script) rarely waits for a handshake, so commands reach Redis in the
    /// order clients sent them, as they would directly.
    pub min_idle_dedicated: usize,
    /// Time allowed to connect and authenticate.
    pub connect_timeout: Duration,
    /// A shared connection whose oldest request has waited this long is
    /// considered dead: its requests fail and it reconnects.
    pub command_timeout: Duration,
    /// First reconnect delay; doubles on each failure up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Consecutive failed rounds of connection attempts that open the
    /// circuit breaker (0: never open it).
    pub breaker_failures: u32,
    /// How long the open circuit refuses requests that need a connection
    /// before one attempt is let through.
    pub breaker_cool_down: Duration,
    /// What a client gets for a command whose outcome is unknown (sent, and
    /// the connection was lost or no reply came within `command_timeout`).
    pub on_lost: OnLost,
    /// Commands sent or queued to Redis and not yet answered, over every
    /// connection: beyond it a request waits (its client's pipeline only)
    /// up to `command_timeout`, then is refused unsent. Bounds nearcache's
    /// memory when Redis slows down or stops.
    pub max_in_flight: usize,
    /// The same cap in request bytes (the bytes buffered for all clients
    /// together on their way to Redis).
    pub max_in_flight_bytes: ByteSize,
    /// Requests written to one connection and not yet answered; the rest
    /// wait their turn in nearcache (so Redis's own buffers for one of its
    /// clients stay small).
    pub max_in_flight_per_connection: usize,
    /// TLS settings for a `rediss://` URL.
    pub tls: UpstreamTlsConfig,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            pool_size: 2,
            max_idle_dedicated: 16,
            min_idle_dedicated: 2,
            connect_timeout: Duration(std::time::Duration::from_secs(2)),
            command_timeout: Duration(std::time::Duration::from_secs(10)),
            reconnect_min: Duration(std::time::Duration::from_millis(50)),
            reconnect_max: Duration(std::time::Duration::from_secs(2)),
            breaker_failures: 5,
            breaker_cool_down: Duration(std::time::Duration::from_millis(500)),
            on_lost: OnLost::Close,
            max_in_flight: 100_000,
            max_in_flight_bytes: ByteSize(256 << 20),
            max_in_flight_per_connection: 10_000,
            tls: UpstreamTlsConfig::default(),
        }
    }
}

/// What a client gets for a command whose outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLost {
    /// Its connection closes after the replies before that command, as its
    /// own connection to a Redis that went away would: client libraries
    /// reconnect and retry as they are configured to.
    Close,
    /// `-ERR upstream connection lost` / `-ERR upstream timeout …`, and the
    /// connection stays.
    Error,
}

/// The L1 cache: a memory budget and the rules that decide what is cached.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// L1 budget in bytes (keys, requests and replies), enforced by weight.
    pub max_memory: ByteSize,
    /// Key-prefix rules; the longest matching prefix wins. A rule with
    /// prefix `""` is the default for every other key; without one, keys no
    /// rule names are not cached.
    pub rules: Vec<RuleConfig>,
    /// Warming L1 from Redis for the rules with `warm = true`.
    pub warm: WarmConfig,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_memory: ByteSize(256 << 20),
            rules: Vec::new(),
            warm: WarmConfig::default(),
        }
    }
}

/// How L1 is warmed (`[cache.warm]`): at start, and after every full flush
/// (an upstream identity change, a bus gap, `FLUSHALL`), nearcache walks
/// Redis with `SCAN` for the keys of rules with `warm = true` and fills L1.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WarmConfig {
    /// Keys fetched per second at most.
    pub rate: u32,
    /// Keys warmed per pass at most.
    pub max_keys: u64,
    /// `SCAN … COUNT`: keys Redis looks at per SCAN call.
    pub scan_count: u32,
    /// Fill RESP3 replies too (doubling what warmed keys weigh); RESP2 only
    /// by default, which most client libraries speak.
    pub resp3: bool,
    /// `/readyz` is not ready until the first pass is done (or `timeout`).
    pub ready_after_warm: bool,
    /// How long `ready_after_warm` may hold readiness back.
    pub timeout: Duration,
}

impl Default for WarmConfig {
    fn default() -> Self {
        Self {
            rate: 5000,
            max_keys: 100_000,
            scan_count: 100,
            resp3: false,
            ready_after_warm: false,
            timeout: Duration(std::time::Duration::from_secs(30)),
        }
    }
}

/// One key-prefix rule.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Keys starting with this are governed by the rule ("" = every key).
    #[serde(default)]
    pub prefix: String,
    /// Instead of `prefix`: a Redis-style glob (`candles:*:1m`) the whole key
    /// must match. Pattern rules are tried before prefix rules, in file order.
    #[serde(default)]
    pub pattern: Option<String>,
    /// How long L1 may keep a reply (never longer than the key's own TTL).
    #[serde(default)]
    pub ttl: Duration,
    /// `false`: never cache matching keys (to exempt a sub-prefix).
    #[serde(default = "yes")]
    pub cache: bool,
    /// Cache "key does not exist" answers this long; unset = don't.
    #[serde(default)]
    pub negative_ttl: Option<Duration>,
    /// Replies larger than this pass through uncached.
    #[serde(default = "default_max_value_size")]
    pub max_value_size: ByteSize,
    /// An expiry nearcache adds to `SET`s of matching keys that carry none
    /// (no EX/PX/EXAT/PXAT/KEEPTTL), so such data cannot live forever in Redis.
    #[serde(default)]
    pub upstream_ttl: Option<Duration>,
    /// For hot entries: once this fraction of the TTL has passed, the next hit
    /// refreshes the entry from upstream in the background (0 < f < 1), so a
    /// key read continuously never misses. Unset = off.
    #[serde(default)]
    pub refresh_ahead: Option<f64>,
    /// While Redis is unreachable (circuit open, connection refused or lost,
    /// timeout), an entry may be served this long past its TTL (never past
    /// the key's own expiry in Redis). Unset = off.
    #[serde(default)]
    pub stale_if_error: Option<Duration>,
    /// Warm L1 with matching keys from Redis (strings with `GET`, hashes with
    /// `HGETALL`) at start and after every full flush (see `[cache.warm]`).
    #[serde(default)]
    pub warm: bool,
    /// Replies at least this large are held in L1 lz4-compressed (when that
    /// saves at least an eighth), and decompressed on every hit. Unset = off.
    #[serde(default)]
    pub compress_min_size: Option<ByteSize>,
    /// String values of at least `compress_min_size` written through
    /// nearcache are stored compressed in Redis, and decompressed on every
    /// read through nearcache (clients reading Redis directly see the
    /// compressed bytes). Off by default.
    #[serde(default)]
    pub store_compressed: bool,
}

impl RuleConfig {
    /// A rule caching keys that start with `prefix` for `ttl`, every other
    /// setting at its default (as a file giving only those two would).
    pub fn caching(prefix: &str, ttl: std::time::Duration) -> RuleConfig {
        RuleConfig {
            prefix: prefix.into(),
            pattern: None,
            ttl: Duration(ttl),
            cache: true,
            negative_ttl: None,
            max_value_size: default_max_value_size(),
            upstream_ttl: None,
            refresh_ahead: None,
            stale_if_error: None,
            warm: false,
            compress_min_size: None,
            store_compressed: false,
        }
    }

    /// How messages name the rule: `("pattern", p)` or `("prefix", p)`.
    pub fn selector(&self) -> (&'static str, &str) {
        match &self.pattern {
            Some(p) => ("pattern", p),
            None => ("prefix", &self.prefix),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_max_value_size() -> ByteSize {
    ByteSize(1 << 20)
}

/// The admin HTTP listener (`/metrics`, `/healthz`, `/readyz`, `/stats`)
/// and what `PROXY …` keeps for administrators (the slow log).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address for `/metrics`, `/healthz`…; empty = disabled.
    pub listen: String,
    /// If set, every endpoint but `/healthz` wants `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// A file holding the token (its first line), instead of `token`: a
    /// mounted secret. Read at start; a reload that finds it changed says
    /// it takes a restart.
    pub token_file: Option<PathBuf>,
    /// Upstream calls slower than this go in the slow log (`PROXY SLOWLOG`).
    pub slowlog_threshold: Duration,
    /// Slow calls kept (the latest); 0 = no slow log.
    pub slowlog_len: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: String::new(),
            token: None,
            token_file: None,
            slowlog_threshold: Duration(std::time::Duration::from_millis(10)),
            slowlog_len: 128,
        }
    }
}

/// The NATS invalidation bus between instances.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoherenceConfig {
    /// `nats://host:port`; empty = a single instance with no bus.
    pub nats_url: String,
    /// Deployments sharing one NATS use different namespaces.
    pub namespace: String,
    /// The subject; empty = `nearcache.<namespace>.invalidate`.
    pub subject: String,
    /// This instance's name on the bus; empty = hostname + pid. The bus adds
    /// a random suffix per process (`name~1a2b3c4d`), so namesakes stay
    /// distinct peers.
    pub instance_id: String,
    /// NATS user and password (both or neither).
    pub user: String,
    /// NATS password.
    pub password: String,
    /// NATS token.
    pub token: String,
    /// NATS `.creds` file (JWT + nkey).
    pub creds_file: String,
    /// Require TLS to NATS.
    pub tls_required: bool,
    /// CA certificates (PEM) to verify the NATS server with.
    pub tls_ca_file: String,
    /// A client certificate (PEM), for a NATS server that verifies its
    /// clients (mutual TLS); goes with `tls_key_file`.
    pub tls_cert_file: String,
    /// The client certificate's private key (PEM).
    pub tls_key_file: String,
    /// While the bus is down: `bypass` (L1 is not served; default) or
    /// `serve-stale` (L1 is served for up to `max_staleness`, then bypassed).
    /// Either way L1 is flushed when the bus comes back.
    pub loss_policy: LossPolicy,
    /// With `serve-stale`: how long after the bus went down L1 is still served.
    pub max_staleness: Duration,
    /// The least time between invalidation messages: one that comes sooner
    /// after the previous message waits (at most this long) for the next,
    /// sharing it with others; one after a quiet spell leaves at once. Zero:
    /// never wait; a message carries whatever was queued by the time the
    /// publisher runs again.
    pub batch_delay: Duration,
    /// ... or as soon as this many keys are waiting.
    pub batch_max_keys: usize,
    /// At most this many keys wait for the publisher; beyond it (NATS slow),
    /// and while NATS is unreachable, invalidations are dropped and peers
    /// flush instead, so an outage cannot grow memory without bound.
    pub max_queued_keys: usize,
    /// Every instance publishes a heartbeat this often.
    pub heartbeat_interval: Duration,
    /// A peer silent this long may have acknowledged writes it never
    /// published (it froze or crashed): L1 is flushed. An instance whose own
    /// latest heartbeat came back longer ago than this (it was paused, or its
    /// subscriber lags) does not serve L1 until it has caught up. This is the
    /// staleness bound while the bus is up.
    pub peer_timeout: Duration,
    /// Also take Redis's own invalidations (`CLIENT TRACKING … BCAST` on the
    /// cached prefixes, over a dedicated RESP3 connection), so writes that
    /// bypass every nearcache — scripts talking to Redis, expiry, eviction —
    /// invalidate L1 too.
    pub redis_tracking: bool,
}

impl Default for CoherenceConfig {
    fn default() -> Self {
        Self {
            nats_url: String::new(),
            namespace: "default".into(),
            subject: String::new(),
            instance_id: String::new(),
            user: String::new(),
            password: String::new(),
            token: String::new(),
            creds_file: String::new(),
            tls_required: false,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            loss_policy: LossPolicy::Bypass,
            max_staleness: Duration(std::time::Duration::from_secs(1)),
            batch_delay: Duration(std::time::Duration::from_millis(1)),
            batch_max_keys: 256,
            max_queued_keys: 65_536,
            redis_tracking: false,
            heartbeat_interval: Duration(std::time::Duration::from_millis(20)),
            peer_timeout: Duration(std::time::Duration::from_millis(100)),
        }
    }
}

/// Who checks a client's `AUTH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// nearcache: `server.password` for the `default` user; every client's
    /// commands run as `upstream.url`'s user.
    #[default]
    Proxy,
    /// Redis: `AUTH user password` is verified by authenticating an upstream
    /// connection as that user, and the client's commands then run on
    /// connections authenticated as it, so Redis's ACL applies unchanged.
    /// Clients that do not authenticate run as `upstream.url`'s user.
    Redis,
}

/// What L1 does while the invalidation bus is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossPolicy {
    /// Do not serve L1 (reads go upstream) until the bus is back.
    #[default]
    Bypass,
    /// Serve L1 for up to `max_staleness`, then bypass.
    ServeStale,
}

impl CoherenceConfig {
    /// The subject invalidations travel on.
    pub fn subject(&self) -> String {
        if self.subject.is_empty() {
            format!("nearcache.{}.invalidate", self.namespace)
        } else {
            self.subject.clone()
        }
    }
}

/// A configuration problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Dotted path of the field, e.g. `server.listen`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown or mistyped field.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, which names the field, line and column.
        message: String,
    },
    /// Fields have values that cannot work; every problem is listed.
    #[error("{origin}: invalid configuration:\n{}", list(.errors))]
    Invalid {
        /// The file, or "command line/environment".
        origin: String,
        /// Every problem found.
        errors: Vec<FieldError>,
    },
}

/// Whether a field named `name` (the last part of its dotted path) holds a
/// secret, which is never shown: passwords, tokens, anything called secret.
pub fn is_secret_field(name: &str) -> bool {
    ["password", "token", "secret"]
        .iter()
        .any(|s| name.contains(s))
}

/// toml's error as one line: where, the key on that line, and what is wrong
/// — but never the line itself, which toml would quote and which may hold a
/// password (a reload's error is logged). For a secret's line, or a URL's
/// (credentials), the detail is left out too, as toml puts values in it.
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_owned();
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let hidden = key.is_some_and(|k| is_secret_field(k) || line.contains("://"));
    let detail = if hidden {
        "invalid value (not shown: it may hold a secret)"
    } else {
        e.message()
    };
    match key {
        Some(key) => format!("line {line_no}, column {column}, at `{key}`: {detail}"),
        None => format!("line {line_no}, column {column}: {detail}"),
    }
}

fn list(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Values that override the file: from the environment, then from flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `server.listen`.
    pub listen: Option<String>,
    /// `upstream.url`.
    pub upstream: Option<String>,
    /// `admin.listen`.
    pub admin: Option<String>,
    /// `coherence.nats_url`.
    pub nats: Option<String>,
    /// `coherence.instance_id`.
    pub instance_id: Option<String>,
}

impl Overrides {
    /// Reads `NEARCACHE_LISTEN`, `NEARCACHE_UPSTREAM` (else `REDIS_URL`),
    /// `NEARCACHE_ADMIN`, `NATS_URL` and `NEARCACHE_INSTANCE_ID`.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            listen: var("NEARCACHE_LISTEN"),
            upstream: var("NEARCACHE_UPSTREAM").or_else(|| var("REDIS_URL")),
            admin: var("NEARCACHE_ADMIN"),
            nats: var("NATS_URL"),
            instance_id: var("NEARCACHE_INSTANCE_ID"),
        }
    }

    /// `self`, with every value `other` sets taking precedence.
    pub fn then(self, other: Overrides) -> Self {
        Self {
            listen: other.listen.or(self.listen),
            upstream: other.upstream.or(self.upstream),
            admin: other.admin.or(self.admin),
            nats: other.nats.or(self.nats),
            instance_id: other.instance_id.or(self.instance_id),
        }
    }
}

impl Config {
    /// Parses TOML text; `path` is used in messages only.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_message(text, &e),
        })
    }

    /// Reads and parses a file (not yet validated), and the files it
    /// names for secrets (`admin.token_file`).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Self::from_toml(&text, path)?;
        if let Some(file) = &cfg.admin.token_file {
            let invalid = |message: String| ConfigError::Invalid {
                origin: path.display().to_string(),
                errors: vec![FieldError {
                    field: "admin.token_file".into(),
                    message,
                }],
            };
            if cfg.admin.token.is_some() {
                return Err(invalid("set with admin.token: use one of them".into()));
            }
            let token = std::fs::read_to_string(file)
                .map_err(|e| invalid(format!("{}: {e}", file.display())))?;
            let token = token.lines().next().unwrap_or("").trim().to_owned();
            if token.is_empty() {
                return Err(invalid(format!("{}: the file is empty", file.display())));
            }
            cfg.admin.token = Some(token);
        }
        Ok(cfg)
    }

    /// Applies overrides from the environment or the command line.
    pub fn apply(&mut self, o: Overrides) {
        if let Some(v) = o.listen {
            self.server.listen = v;
        }
        if let Some(v) = o.upstream {
            self.upstream.url = v;
        }
        if let Some(v) = o.admin {
            self.admin.listen = v;
        }
        if let Some(v) = o.nats {
            self.coherence.nats_url = v;
        }
        if let Some(v) = o.instance_id {
            self.coherence.instance_id = v;
        }
    }

    /// The parsed upstream URL, with its TLS settings built (the files in
    /// `[upstream.tls]` read) for `rediss://`; call after
    /// [`validate`](Self::validate).
    pub fn upstream_url(&self) -> Result<RedisUrl, ConfigError> {
        let invalid = |field: &str, message| ConfigError::Invalid {
            origin: "configuration".into(),
            errors: vec![FieldError {
                field: field.into(),
                message,
            }],
        };
        let mut url =
            RedisUrl::parse(&self.upstream.url).map_err(|m| invalid("upstream.url", m))?;
        if url.secure {
            let tls = crate::tls::UpstreamTls::new(&self.upstream.tls, &url.host)
                .map_err(|e| invalid(e.field(), e.detail()))?;
            url.tls = Some(tls);
        }
        Ok(url)
    }

    /// The client input limits.
    pub fn limits(&self) -> crate::protocol::Limits {
        crate::protocol::Limits {
            max_args: self.server.max_args,
            max_bulk: self.server.max_bulk_bytes.as_usize(),
            max_inline: self.server.max_inline_bytes.as_usize(),
            max_request: self.server.max_request_bytes.as_usize(),
        }
    }
}

#[cfg(test)]
mod tests;
