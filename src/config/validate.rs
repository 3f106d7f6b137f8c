//! `Config::validate`: every field checked, every problem reported at once,
//! each naming its field.

use std::net::SocketAddr;

use super::*;

/// The longest slow log `admin.slowlog_len` may ask for.
const MAX_SLOWLOG_LEN: usize = 100_000;

impl Config {
    /// Whether clients must prove who they are before a command runs: a
    /// password for `default`, or users of which `default` (if listed) needs
    /// a password (what protected mode asks for).
    pub fn clients_authenticate(&self) -> bool {
        let open_default = self
            .users
            .iter()
            .any(|u| u.name == "default" && u.enabled && u.nopass);
        self.server.password.is_some() || (!self.users.is_empty() && !open_default)
    }

    /// Listeners on a non-loopback address that nothing guards, each with
    /// the message protected mode refuses it with (which says how to fix it).
    fn unprotected_listeners(&self) -> Vec<(&'static str, String)> {
        let exposed = |addr: &str| {
            addr.parse::<SocketAddr>()
                .is_ok_and(|a| !a.ip().is_loopback())
        };
        let mut found = Vec::new();
        let tls = self.server.tls.as_ref();
        // A listener is guarded by a password, or by TLS that every client
        // must pass with a certificate the client CA signed.
        let guarded = |speaks_tls: bool| {
            self.clients_authenticate()
                || (speaks_tls && tls.is_some_and(|t| t.authenticates_clients()))
        };
        let how = "set server.password or [[users]], or [server.tls] client_ca_file with \
                   client_auth = \"required\", or bind a loopback address, \
                   or set server.protected_mode = false if the network itself is trusted";
        let main_tls = tls.is_some() && self.server.tls_listen.is_empty();
        if exposed(&self.server.listen) && !guarded(main_tls) {
            found.push((
                "server.listen",
                format!(
                    "'{}' is reachable from other hosts and no client must authenticate \
                     (protected mode): {how}",
                    self.server.listen
                ),
            ));
        }
        if exposed(&self.server.tls_listen) && !guarded(true) {
            found.push((
                "server.tls_listen",
                format!(
                    "'{}' is reachable from other hosts and no client must authenticate \
                     (protected mode): {how}",
                    self.server.tls_listen
                ),
            ));
        }
        if exposed(&self.admin.listen)
            && self.admin.token.is_none()
            && self.admin.token_file.is_none()
        {
            found.push((
                "admin.listen",
                format!(
                    "'{}' is reachable from other hosts and has no token (protected mode): \
                     set admin.token or admin.token_file, or bind a loopback address, \
                     or set server.protected_mode = false",
                    self.admin.listen
                ),
            ));
        }
        found
    }

    /// `[server.tls]` and `server.tls_listen`, reading the certificate and
    /// key files (so check-config, start and reload refuse a broken one).
    fn validate_server_tls(&self, bad: &mut impl FnMut(&str, String)) {
        let listen = &self.server.tls_listen;
        if !listen.is_empty() {
            if let Err(e) = listen.parse::<SocketAddr>() {
                bad(
                    "server.tls_listen",
                    format!("'{listen}' is not an address ({e}); use e.g. \"0.0.0.0:6381\""),
                );
            }
            if self.server.tls.is_none() {
                bad(
                    "server.tls_listen",
                    "needs [server.tls] (cert_file, key_file)".into(),
                );
            }
            if *listen == self.server.listen {
                bad(
                    "server.tls_listen",
                    "is the same address as server.listen".into(),
                );
            }
        }
        let Some(tls) = &self.server.tls else {
            return;
        };
        if tls.client_auth.is_some() && tls.client_ca_file.is_none() {
            bad(
                "server.tls.client_auth",
                "needs server.tls.client_ca_file (the CA client certificates are checked against)"
                    .into(),
            );
        }
        if tls.handshake_timeout.0.is_zero() {
            bad("server.tls.handshake_timeout", "must be more than 0".into());
        }
        if let Err(e) = crate::tls::server_config(tls) {
            bad(e.field(), e.detail());
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
        if self.server.auth == AuthMode::Redis && self.server.password.is_some() {
            bad(
                "server.auth",
                "\"redis\" lets Redis check clients' passwords: leave server.password unset".into(),
            );
        }
        if self.server.auth == AuthMode::Redis && !self.users.is_empty() {
            bad(
                "users",
                "\"redis\" lets Redis's own ACL users decide: remove [[users]] or set server.auth = \"proxy\"".into(),
            );
        }
        if let Err(e) = crate::acl::Users::new(self.server.password.as_deref(), &self.users) {
            bad(
                &format!("users[{}] (\"{}\").{}", e.index, e.name, e.field),
                e.message,
            );
        }
        if let Err((field, message)) =
            crate::acl::Fence::new(&self.server.deny, &self.server.rename)
        {
            bad(field, message);
        }
        if self.server.password.as_deref() == Some("") {
            bad(
                "server.password",
                "is empty; remove it to disable client authentication".into(),
            );
        }
        match RedisUrl::parse(&self.upstream.url) {
            Err(e) => bad("upstream.url", e),
            // Built now so a bad file is a start-up error naming it, as
            // every reconnect would fail alike.
            Ok(url) if url.secure => {
                if let Err(e) = crate::tls::UpstreamTls::new(&self.upstream.tls, &url.host) {
                    bad(e.field(), e.detail());
                }
            }
            Ok(_) if self.upstream.tls != UpstreamTlsConfig::default() => bad(
                "upstream.tls",
                "is set but upstream.url is redis:// (plain text): use rediss://".into(),
            ),
            Ok(_) => {}
        }
        self.validate_server_tls(&mut bad);
        if self.upstream.pool_size == 0 || self.upstream.pool_size > 64 {
            bad(
                "upstream.pool_size",
                format!("{} is out of range (1 to 64)", self.upstream.pool_size),
            );
        }
        if self.upstream.min_idle_dedicated > self.upstream.max_idle_dedicated {
            bad(
                "upstream.min_idle_dedicated",
                format!(
                    "{} is more than upstream.max_idle_dedicated ({})",
                    self.upstream.min_idle_dedicated, self.upstream.max_idle_dedicated
                ),
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
        for (field, n) in [
            ("upstream.max_in_flight", self.upstream.max_in_flight),
            (
                "upstream.max_in_flight_bytes",
                self.upstream.max_in_flight_bytes.as_usize(),
            ),
            (
                "upstream.max_in_flight_per_connection",
                self.upstream.max_in_flight_per_connection,
            ),
        ] {
            if n == 0 {
                bad(field, "must be more than 0".into());
            } else if n > u32::MAX as usize {
                bad(field, format!("{n} is more than {}", u32::MAX));
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
        if self.server.protected_mode {
            for (field, message) in self.unprotected_listeners() {
                bad(field, message);
            }
        }
        if self.admin.slowlog_len > MAX_SLOWLOG_LEN {
            bad(
                "admin.slowlog_len",
                format!(
                    "{} is more than {MAX_SLOWLOG_LEN} (the slow log is kept in memory)",
                    self.admin.slowlog_len
                ),
            );
        }
        if self.admin.slowlog_threshold.0 > std::time::Duration::from_secs(3600) {
            bad(
                "admin.slowlog_threshold",
                format!(
                    "{} is more than 1h (no call waits that long; set slowlog_len = 0 to turn the slow log off)",
                    self.admin.slowlog_threshold
                ),
            );
        }
        let warm = &self.cache.warm;
        if warm.rate == 0 {
            bad(
                "cache.warm.rate",
                "must be at least 1 (keys per second)".into(),
            );
        }
        if warm.max_keys == 0 {
            bad(
                "cache.warm.max_keys",
                "must be at least 1 (to turn warming off, remove warm = true from the rules)"
                    .into(),
            );
        }
        if warm.scan_count == 0 {
            bad("cache.warm.scan_count", "must be at least 1".into());
        }
        if warm.ready_after_warm && warm.timeout.0.is_zero() {
            bad(
                "cache.warm.timeout",
                "must be more than 0 with ready_after_warm".into(),
            );
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
            if rule.stale_if_error.is_some_and(|d| d.0.is_zero()) {
                bad(
                    &field("stale_if_error"),
                    "must be more than 0 (remove it to disable)".into(),
                );
            }
            if rule.compress_min_size.is_some_and(|s| s.0 == 0) {
                bad(
                    &field("compress_min_size"),
                    "must be at least 1 byte (remove it to disable)".into(),
                );
            }
            if rule.store_compressed && rule.compress_min_size.is_none() {
                bad(
                    &field("store_compressed"),
                    "needs compress_min_size, the size from which values are stored compressed"
                        .into(),
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
        let mut names = std::collections::HashSet::new();
        for (i, limit) in self.limits.iter().enumerate() {
            let field = |name: &str| format!("limits[{i}] (\"{}\").{name}", limit.name);
            if limit.name.is_empty() {
                bad(
                    &field("name"),
                    "must not be empty: errors and counters name the limit".into(),
                );
            } else if !names.insert(&limit.name) {
                bad(&field("name"), "another limit has the same name".into());
            }
            let count = limit.rate.count;
            if count > u64::from(u32::MAX) || limit.rate.period.as_nanos() < u128::from(count) {
                bad(
                    &field("rate"),
                    format!("{} is more than one per nanosecond", limit.rate),
                );
            }
            if let Some(burst) = limit.burst {
                if burst == 0 || burst > u64::from(u32::MAX) {
                    bad(
                        &field("burst"),
                        format!("{burst} is out of range (1 to 4294967295)"),
                    );
                }
            }
            if let Err(e) = crate::limits::CommandSet::new(&limit.commands) {
                bad(&field("commands"), e);
            }
            if limit.keys.iter().any(String::is_empty) {
                bad(&field("keys"), "a glob must not be empty".into());
            }
            let mut per = std::collections::HashSet::new();
            for p in &limit.per {
                if !per.insert(p) {
                    bad(&field("per"), format!("'{}' is listed twice", p.name()));
                }
            }
            if limit.per.contains(&crate::config::Per::Pattern) && limit.keys.is_empty() {
                bad(
                    &field("per"),
                    "'pattern' needs keys = [...] to tell patterns apart".into(),
                );
            }
            if limit.scope == crate::config::Scope::Fleet && self.coherence.nats_url.is_empty() {
                bad(
                    &field("scope"),
                    "\"fleet\" shares the rate among the instances on the coherence bus: set coherence.nats_url".into(),
                );
            }
            if limit.action == crate::config::Action::Delay && limit.max_wait.0.is_zero() {
                bad(
                    &field("max_wait"),
                    "must be more than 0 for action = \"delay\"".into(),
                );
            }
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
}
