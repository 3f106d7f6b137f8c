//! Configuration: the TOML file, environment overrides and command-line flags,
//! merged in that order (flags win), then validated with messages that name the
//! file and the field.
//!
//! Every option and its default lives here, in the `Default` impls; the
//! shipped `config.toml` documents the same values and a test keeps the two in
//! step.

mod units;
mod upstream_url;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use units::{ByteSize, Duration};
pub use upstream_url::RedisUrl;

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
            max_args: 1024 * 1024,
            max_bulk_bytes: ByteSize(512 << 20),
            max_request_bytes: ByteSize(512 << 20),
            max_inline_bytes: ByteSize(64 << 10),
            max_pending_replies: 1024,
        }
    }
}

/// The upstream Redis.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Shared, pipelined connections per (database, protocol) in use.
    pub pool_size: usize,
    /// Idle dedicated connections kept per (database, protocol) for
    /// transactions and blocking commands.
    pub max_idle_dedicated: usize,
    /// Time allowed to connect and authenticate.
    pub connect_timeout: Duration,
    /// A shared connection whose oldest request has waited this long is
    /// considered dead: its requests fail and it reconnects.
    pub command_timeout: Duration,
    /// First reconnect delay; doubles on each failure up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            pool_size: 2,
            max_idle_dedicated: 16,
            connect_timeout: Duration(std::time::Duration::from_secs(2)),
            command_timeout: Duration(std::time::Duration::from_secs(10)),
            reconnect_min: Duration(std::time::Duration::from_millis(50)),
            reconnect_max: Duration(std::time::Duration::from_secs(2)),
        }
    }
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
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_memory: ByteSize(256 << 20),
            rules: Vec::new(),
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

/// HTTP endpoints for metrics and health (not served yet).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address for `/metrics`, `/healthz`…; empty = disabled.
    pub listen: String,
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
            message: e.to_string().trim_end().to_owned(),
        })
    }

    /// Reads and parses a file (not yet validated).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
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

    /// Checks every field and reports all problems at once; `origin` (the file
    /// name) prefixes the message.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, message: String| {
            errors.push(FieldError {
                field: field.into(),
                message,
            })
        };
        if let Err(e) = self.server.listen.parse::<SocketAddr>() {
            bad(
                "server.listen",
                format!(
                    "'{}' is not an address ({e}); use e.g. \"127.0.0.1:6380\"",
                    self.server.listen
                ),
            );
        }
        if self.server.threads > 256 {
            bad(
                "server.threads",
                format!(
                    "{} is out of range (0 = one per core, up to 256)",
                    self.server.threads
                ),
            );
        }
        if self.server.max_clients == 0 {
            bad("server.max_clients", "must be at least 1".into());
        }
        if self.server.max_args == 0 {
            bad("server.max_args", "must be at least 1".into());
        }
        if self.server.max_pending_replies == 0 {
            bad("server.max_pending_replies", "must be at least 1".into());
        }
        for (field, size) in [
            ("server.max_bulk_bytes", self.server.max_bulk_bytes),
            ("server.max_request_bytes", self.server.max_request_bytes),
            ("server.max_inline_bytes", self.server.max_inline_bytes),
        ] {
            if size.0 < 16 {
                bad(field, format!("{size} is too small (at least 16B)"));
            }
        }
        if self.server.password.as_deref() == Some("") {
            bad(
                "server.password",
                "is empty; remove it to disable client authentication".into(),
            );
        }
        if let Err(e) = RedisUrl::parse(&self.upstream.url) {
            bad("upstream.url", e);
        }
        if self.upstream.pool_size == 0 || self.upstream.pool_size > 64 {
            bad(
                "upstream.pool_size",
                format!("{} is out of range (1 to 64)", self.upstream.pool_size),
            );
        }
        for (field, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.command_timeout", self.upstream.command_timeout),
            ("upstream.reconnect_min", self.upstream.reconnect_min),
        ] {
            if d.0.is_zero() {
                bad(field, "must be more than 0".into());
            }
        }
        if self.upstream.reconnect_max < self.upstream.reconnect_min {
            bad(
                "upstream.reconnect_max",
                format!(
                    "{} is less than upstream.reconnect_min",
                    self.upstream.reconnect_max
                ),
            );
        }
        if !self.admin.listen.is_empty() {
            if let Err(e) = self.admin.listen.parse::<SocketAddr>() {
                bad(
                    "admin.listen",
                    format!("'{}' is not an address ({e})", self.admin.listen),
                );
            }
        }
        if self.cache.max_memory.0 < 1024 {
            bad(
                "cache.max_memory",
                format!("{} is too small (at least 1KiB)", self.cache.max_memory),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, rule) in self.cache.rules.iter().enumerate() {
            let (kind, selector) = rule.selector();
            let field = |name: &str| format!("cache.rules[{i}] ({kind} \"{selector}\").{name}");
            if !seen.insert((kind, selector)) {
                bad(&field(kind), format!("another rule has the same {kind}"));
            }
            if rule.pattern.is_some() && !rule.prefix.is_empty() {
                bad(
                    &field("pattern"),
                    "set either prefix or pattern, not both".into(),
                );
            }
            if rule.pattern.as_deref() == Some("") {
                bad(
                    &field("pattern"),
                    "must not be empty (use prefix = \"\" for a default rule)".into(),
                );
            }
            if rule.cache && rule.ttl.0.is_zero() {
                bad(
                    &field("ttl"),
                    "must be more than 0 for a rule that caches (or set cache = false)".into(),
                );
            }
            if rule.refresh_ahead.is_some_and(|f| !(f > 0.0 && f < 1.0)) {
                bad(
                    &field("refresh_ahead"),
                    "must be a fraction between 0 and 1 (e.g. 0.8)".into(),
                );
            }
            if rule.upstream_ttl.is_some_and(|d| d.0.as_millis() == 0) {
                bad(
                    &field("upstream_ttl"),
                    "must be at least 1ms (remove it to disable)".into(),
                );
            }
            if rule.negative_ttl.is_some_and(|d| d.0.is_zero()) {
                bad(
                    &field("negative_ttl"),
                    "must be more than 0 (remove it to disable)".into(),
                );
            }
        }
        let c = &self.coherence;
        if c.namespace.is_empty()
            || c.namespace
                .contains(|ch: char| ch.is_whitespace() || ch == '.' || ch == '*' || ch == '>')
        {
            bad(
                "coherence.namespace",
                format!(
                    "'{}' must be a non-empty subject token (no spaces, '.', '*' or '>')",
                    c.namespace
                ),
            );
        }
        if c.user.is_empty() != c.password.is_empty() {
            bad("coherence.user", "user and password go together".into());
        }
        if c.heartbeat_interval.0.is_zero() || c.peer_timeout.0 < c.heartbeat_interval.0 * 2 {
            bad(
                "coherence.peer_timeout",
                format!(
                    "{} must be at least twice heartbeat_interval ({})",
                    c.peer_timeout, c.heartbeat_interval
                ),
            );
        }
        // The message format holds 255 bytes of id, and the bus adds a
        // 9-byte suffix (`~` and 8 hex digits).
        if c.instance_id.len() > 246 {
            bad(
                "coherence.instance_id",
                format!("{} bytes long; at most 246", c.instance_id.len()),
            );
        }
        if c.batch_max_keys == 0 {
            bad("coherence.batch_max_keys", "must be at least 1".into());
        }
        if c.max_queued_keys == 0 {
            bad("coherence.max_queued_keys", "must be at least 1".into());
        }
        if c.tls_cert_file.is_empty() != c.tls_key_file.is_empty() {
            bad(
                "coherence.tls_cert_file",
                "tls_cert_file and tls_key_file go together: set both or neither".into(),
            );
        }
        // Unreadable at start-up would mean a bus that never connects, each
        // attempt failing alike: say so now, naming the field.
        for (field, path) in [
            ("coherence.tls_ca_file", &c.tls_ca_file),
            ("coherence.tls_cert_file", &c.tls_cert_file),
            ("coherence.tls_key_file", &c.tls_key_file),
            ("coherence.creds_file", &c.creds_file),
        ] {
            if path.is_empty() {
                continue;
            }
            // (metadata, not open: opening a FIFO would block.)
            match std::fs::metadata(path) {
                Ok(m) if m.is_file() => {}
                Ok(_) => bad(field, format!("cannot read {path}: not a file")),
                Err(e) => bad(field, format!("cannot read {path}: {e}")),
            }
        }
        if c.batch_delay.0 > std::time::Duration::from_millis(100) {
            bad(
                "coherence.batch_delay",
                format!(
                    "{} is longer than 100ms: invalidations would lag",
                    c.batch_delay
                ),
            );
        }
        let nats = &self.coherence.nats_url;
        if !(nats.is_empty() || nats.starts_with("nats://") || nats.starts_with("tls://")) {
            bad(
                "coherence.nats_url",
                format!("'{nats}' is not a nats:// URL"),
            );
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                origin: origin.into(),
                errors,
            })
        }
    }

    /// The parsed upstream URL; call after [`validate`](Self::validate).
    pub fn upstream_url(&self) -> Result<RedisUrl, ConfigError> {
        RedisUrl::parse(&self.upstream.url).map_err(|message| ConfigError::Invalid {
            origin: "configuration".into(),
            errors: vec![FieldError {
                field: "upstream.url".into(),
                message,
            }],
        })
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
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn shipped_config_toml_parses_validates_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let cfg = Config::from_file(&path).unwrap();
        cfg.validate("config.toml").unwrap();
        // Every value in the shipped file is the default, so the file is a
        // faithful reference for operators.
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = Config::from_toml("[server]\nlisten_addr = \"x\"\n", Path::new("my.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("my.toml:"), "{err}");
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn mistyped_values_are_named() {
        let err = Config::from_toml(
            "[upstream]\ncommand_timeout = \"fast\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("command_timeout") && err.contains("fast"),
            "{err}"
        );
    }

    #[test]
    fn validation_lists_every_problem_with_its_field() {
        let cfg = Config::from_toml(
            "[server]\nlisten = \"nowhere\"\nmax_clients = 0\n[upstream]\nurl = \"http://x\"\npool_size = 0\n",
            Path::new("c.toml"),
        )
        .unwrap();
        let err = cfg.validate("c.toml").unwrap_err().to_string();
        for field in [
            "server.listen",
            "server.max_clients",
            "upstream.url",
            "upstream.pool_size",
        ] {
            assert!(err.contains(field), "{field} missing from: {err}");
        }
        assert!(err.starts_with("c.toml:"), "{err}");
    }

    #[test]
    fn cache_rules_parse_and_bad_rules_are_named() {
        let cfg = Config::from_toml(
            "[cache]\nmax_memory = \"64MiB\"\n[[cache.rules]]\nprefix = \"ticker:\"\nttl = \"2s\"\n\
             [[cache.rules]]\nprefix = \"orderbook:\"\nttl = \"500ms\"\nnegative_ttl = \"100ms\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        cfg.validate("c.toml").unwrap();
        assert_eq!(cfg.cache.rules.len(), 2);
        assert_eq!(
            cfg.cache.rules[1].ttl.0,
            std::time::Duration::from_millis(500)
        );
        assert!(cfg.cache.rules[0].cache);

        let bad = Config::from_toml(
            "[[cache.rules]]\nprefix = \"a:\"\n[[cache.rules]]\nprefix = \"a:\"\nttl = \"1s\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        let err = bad.validate("c.toml").unwrap_err().to_string();
        assert!(err.contains("cache.rules[0] (prefix \"a:\").ttl"), "{err}");
        assert!(
            err.contains("cache.rules[1] (prefix \"a:\").prefix"),
            "{err}"
        );
    }

    #[test]
    fn pattern_rules_are_named_by_their_pattern_and_checked() {
        let ok = Config::from_toml(
            "[[cache.rules]]\npattern = \"candles:*:1m\"\nttl = \"5s\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        ok.validate("c.toml").unwrap();
        assert_eq!(ok.cache.rules[0].selector(), ("pattern", "candles:*:1m"));

        let bad = Config::from_toml(
            "[[cache.rules]]\nprefix = \"c:\"\npattern = \"c:*\"\nttl = \"1s\"\n\
             [[cache.rules]]\npattern = \"\"\nttl = \"1s\"\n\
             [[cache.rules]]\npattern = \"x*\"\nttl = \"1s\"\n\
             [[cache.rules]]\npattern = \"x*\"\nttl = \"2s\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        let err = bad.validate("c.toml").unwrap_err().to_string();
        for want in [
            "c.toml",
            "cache.rules[0] (pattern \"c:*\").pattern: set either prefix or pattern",
            "cache.rules[1] (pattern \"\").pattern: must not be empty",
            "cache.rules[3] (pattern \"x*\").pattern: another rule has the same pattern",
        ] {
            assert!(err.contains(want), "missing {want:?} in {err}");
        }
    }

    #[test]
    fn nats_tls_files_must_be_readable_and_cert_and_key_go_together() {
        let bad = Config::from_toml(
            "[coherence]\ntls_ca_file = \"/nonexistent/ca.pem\"\n\
             tls_cert_file = \"/nonexistent/client.pem\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        let err = bad.validate("c.toml").unwrap_err().to_string();
        for want in [
            "coherence.tls_ca_file: cannot read /nonexistent/ca.pem",
            "coherence.tls_cert_file: tls_cert_file and tls_key_file go together",
            "coherence.tls_cert_file: cannot read /nonexistent/client.pem",
        ] {
            assert!(err.contains(want), "missing {want:?} in {err}");
        }
    }

    #[test]
    fn overrides_take_precedence_in_order() {
        let mut cfg = Config::default();
        let env = Overrides {
            listen: Some("127.0.0.1:1".into()),
            upstream: Some("redis://env:1".into()),
            ..Default::default()
        };
        let flags = Overrides {
            upstream: Some("redis://flag:2".into()),
            ..Default::default()
        };
        cfg.apply(env.then(flags));
        assert_eq!(cfg.server.listen, "127.0.0.1:1");
        assert_eq!(cfg.upstream.url, "redis://flag:2");
    }
}
