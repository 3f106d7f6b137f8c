//! What nearcache answers itself from the session's own state: `AUTH`,
//! `HELLO`, `SELECT`, `RESET` and the `CLIENT` subcommands about the
//! client's own connection (`ID`, `SETNAME`, `GETNAME`, `NO-EVICT`, `REPLY`);
//! those about nearcache's clients (`LIST`, `INFO`, `KILL`) are in
//! `clients.rs`. And the ids clients got from nearcache, translated for
//! Redis.

use bytes::{Bytes, BytesMut};

use super::mode::Mode;
use super::{Flow, Request, Session, owned};
use crate::config::AuthMode;
use crate::error::{ErrorKind, ProxyError};
use crate::protocol::parser::{keyword, parse_i64};
use crate::protocol::reply::{self, OK, Protocol, Reply};
use crate::server::directory::Reserved;
use crate::server::route::Route;
use crate::upstream::{PoolKey, UpstreamError};

/// Redis's answer to credentials it does not accept.
const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

impl Session {
    /// A command nearcache answers itself, answered where the mode needs it.
    pub(super) async fn local(&mut self, req: &Request<'_>) -> Flow {
        let r = self.local_reply(req.route, &req.argv).await;
        self.answer(req, r).await;
        if self.client.closing {
            return self.close();
        }
        Flow::Continue
    }

    /// The reply to a command nearcache answers itself, from the session's
    /// state.
    pub(super) async fn local_reply(&mut self, route: Route, argv: &[Bytes]) -> Bytes {
        match route {
            Route::Auth => self.auth(&argv[1..]).await,
            Route::ClientSetName => self.set_name(argv.get(2)),
            Route::ClientGetName => {
                let mut r = Reply::new(self.client.proto);
                match &self.client.name {
                    Some(name) => r.bulk(name),
                    None => r.null(),
                };
                r.finish()
            }
            Route::ClientId => {
                let mut r = Reply::new(self.client.proto);
                r.int(self.client.id as i64);
                r.finish()
            }
            Route::ClientKill => self.client_kill(argv),
            Route::ClientGetRedir => self.client_getredir().await,
            Route::ClientList => self.client_list(argv, false).await,
            Route::ClientInfo => self.client_list(argv, true).await,
            Route::AclWhoami => {
                let mut r = Reply::new(self.client.proto);
                r.bulk(self.user_name().as_bytes());
                r.finish()
            }
            // Only ON and bad modes are queued (see `queued`); ON's reply is
            // an element of EXEC's, and replies come back on from it.
            Route::ClientReply => match reply_mode(argv) {
                Some(ReplyMode::On) => {
                    self.muting.off = false;
                    Bytes::from_static(OK)
                }
                _ => reply::error("ERR syntax error"),
            },
            // Redis never evicts a client of nearcache: there is nothing to
            // protect, and the shared connection must not carry the flag.
            // (Shown as the `e` flag in CLIENT LIST, as Redis shows it.)
            Route::ClientNoEvict => match argv.get(2) {
                Some(v) if v.eq_ignore_ascii_case(b"on") || v.eq_ignore_ascii_case(b"off") => {
                    self.client.no_evict = v.eq_ignore_ascii_case(b"on");
                    Bytes::from_static(OK)
                }
                _ => reply::error("ERR syntax error"),
            },
            _ => reply::error("ERR internal: not a command nearcache answers"),
        }
    }

    /// `AUTH [user] password`: checked against `server.password`, or by
    /// Redis.
    async fn auth(&mut self, args: &[Bytes]) -> Bytes {
        let (user, pass) = match args {
            [pass] => (None, pass),
            [user, pass] => (Some(user), pass),
            _ => return reply::error("ERR syntax error"),
        };
        if self.ctx.cfg.server.auth == AuthMode::Redis {
            return self.auth_by_redis(user.map(|u| &u[..]), pass).await;
        }
        if self.snapshot.users.enforced {
            let name = user.map_or(&b"default"[..], |u| &u[..]);
            return match self.snapshot.users.authenticate(name, pass) {
                Some(user) => {
                    self.client.acl = user;
                    self.client.authed = true;
                    Bytes::from_static(OK)
                }
                None => self.wrong_pass(),
            };
        }
        let default_user = user.is_none_or(|u| &u[..] == b"default");
        let Some(expected) = &self.snapshot.password else {
            // As Redis's `default` user without a password (`nopass`): it
            // takes any password when named, so clients configured with
            // credentials still connect; the one-argument form is refused.
            return match user {
                None => reply::error(
                    "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
                ),
                Some(_) if default_user => {
                    self.client.authed = true;
                    Bytes::from_static(OK)
                }
                Some(_) => self.wrong_pass(),
            };
        };
        if !default_user || !constant_time_eq(pass, expected.as_bytes()) {
            return self.wrong_pass();
        }
        self.client.authed = true;
        Bytes::from_static(OK)
    }

    /// Redis judges the `AUTH` (on a connection of its own, each time); on
    /// success the client's commands run on connections authenticated as
    /// that user (a pool per user), so Redis's ACL applies to them
    /// unchanged; a refusal is Redis's own reply (`-WRONGPASS …`).
    async fn auth_by_redis(&mut self, user: Option<&[u8]>, pass: &[u8]) -> Bytes {
        let args: Vec<&[u8]> = user.into_iter().chain([pass]).collect();
        if let Err(e) = self.ctx.upstream.check_auth(&args).await {
            self.ctx.stats.requests.error(ErrorKind::Auth, 1);
            return e.to_reply();
        }
        let credentials = self
            .ctx
            .upstream
            .credentials(user.unwrap_or(b"default"), pass);
        let key = PoolKey {
            db: self.client.db,
            proto: self.client.proto,
            user: Some(credentials.clone()),
        };
        match self.lane.switch(key).await {
            Ok(()) => {
                self.client.user = Some(credentials);
                self.client.authed = true;
                Bytes::from_static(OK)
            }
            Err(e) => {
                self.ctx.stats.requests.error(ErrorKind::Auth, 1);
                e.to_reply()
            }
        }
    }

    /// Credentials refused: AUTH's reply, counted.
    fn wrong_pass(&self) -> Bytes {
        self.ctx.stats.requests.error(ErrorKind::Auth, 1);
        reply::error(WRONGPASS)
    }

    /// `HELLO`: on a pinned connection Redis itself answers (the pinned
    /// connection's replies must switch protocol too); otherwise nearcache.
    pub(super) async fn hello(&mut self, req: &Request<'_>) {
        let requested = requested_protocol(&req.argv);
        if let Some(pin) = self.mode.pin_mut() {
            pin.dirty = true;
            if self.mode.in_transaction() {
                // Queued: it takes effect at EXEC, if at all; the unpin
                // reads back what the connection ended up with.
                if let Some(p) = requested {
                    self.client.proto = p;
                }
                return self.forward(req).await;
            }
            let mut r = self.ask_pinned(req).await;
            if let (Some(p), Some(b'%' | b'*')) = (requested, r.first()) {
                self.client.proto = p;
            }
            // Redis reports its id for the pinned connection; the client's
            // id is nearcache's, as CLIENT ID says.
            if let Some(ours) = with_hello_id(&r, self.client.id) {
                r = ours;
            }
            return self.answer(req, r).await;
        }
        let r = self.hello_reply(&req.argv).await;
        self.answer(req, r).await;
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`, answered here.
    async fn hello_reply(&mut self, argv: &[Bytes]) -> Bytes {
        let mut proto = self.client.proto;
        let args = &argv[1..];
        if let Some(v) = args.first() {
            match parse_i64(v) {
                Some(2) => proto = Protocol::Resp2,
                Some(3) => proto = Protocol::Resp3,
                Some(_) => return reply::error("NOPROTO unsupported protocol version"),
                None => {
                    return reply::error("ERR Protocol version is not an integer or out of range");
                }
            }
        }
        let mut i = 1;
        let mut auth = None;
        let mut name = None;
        while i < args.len() {
            let opt = &args[i];
            if opt.eq_ignore_ascii_case(b"auth") && args.len() > i + 2 {
                auth = Some(&args[i + 1..i + 3]);
                i += 3;
            } else if opt.eq_ignore_ascii_case(b"setname") && args.len() > i + 1 {
                name = Some(&args[i + 1]);
                i += 2;
            } else {
                return reply::error(&format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(opt)
                ));
            }
        }
        if let Some(credentials) = auth {
            let r = self.auth(credentials).await;
            if &r[..] != OK {
                return r;
            }
        }
        if !self.client.authed {
            return reply::error(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
            );
        }
        if let Some(name) = name {
            if !valid_client_name(name) {
                return reply::error(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                );
            }
            self.client.name = (!name.is_empty()).then(|| owned(name));
        }
        if let Err(e) = self.switch(self.client.db, proto).await {
            return e.to_reply();
        }
        let version = self.ctx.upstream.server_version();
        let mut r = Reply::new(proto);
        r.map(7);
        r.bulk(b"server").bulk(b"redis");
        r.bulk(b"version").bulk(version.as_bytes());
        r.bulk(b"proto").int(proto.version());
        r.bulk(b"id").int(self.client.id as i64);
        r.bulk(b"mode").bulk(b"standalone");
        r.bulk(b"role").bulk(b"master");
        r.bulk(b"modules").array(0);
        r.finish()
    }

    /// `SELECT n`: the session moves to database `n`'s pool; pinned, Redis
    /// itself switches the pinned connection.
    pub(super) async fn select(&mut self, req: &Request<'_>) {
        let Some(db) = req.argv.get(1).and_then(|a| parse_i64(a)) else {
            return self
                .answer(
                    req,
                    reply::error("ERR value is not an integer or out of range"),
                )
                .await;
        };
        let Ok(db) = u32::try_from(db) else {
            return self
                .answer(req, reply::error("ERR DB index is out of range"))
                .await;
        };
        if let Some(pin) = self.mode.pin_mut() {
            pin.dirty = true;
            if self.mode.in_transaction() {
                // Queued: it takes effect at EXEC, if at all. The keys of the
                // writes queued after it are taken in `db` (more invalidation
                // rather than less), and the unpin reads back where the
                // connection ended up.
                self.client.db = db;
                return self.forward(req).await;
            }
            // Effective now if Redis accepts it: the writes that follow (and
            // their invalidations) are in `db` only then.
            let r = self.ask_pinned(req).await;
            if &r[..] == OK {
                self.client.db = db;
            }
            return self.answer(req, r).await;
        }
        let r = match self.switch(db, self.client.proto).await {
            Ok(()) => Bytes::from_static(OK),
            // (Redis's own words for a refused database.)
            Err(e) => e.to_reply(),
        };
        self.answer(req, r).await;
    }

    /// Moves the session to the shared connections of `db` and `proto`.
    pub(super) async fn switch(&mut self, db: u32, proto: Protocol) -> Result<(), UpstreamError> {
        let user = self.client.user.clone();
        self.lane.switch(PoolKey { db, proto, user }).await?;
        self.client.db = db;
        self.client.proto = proto;
        Ok(())
    }

    /// `CLIENT SETNAME name`.
    fn set_name(&mut self, name: Option<&Bytes>) -> Bytes {
        let Some(name) = name else {
            return ProxyError::wrong_arity("client|setname").to_reply();
        };
        if !valid_client_name(name) {
            return reply::error(
                "ERR Client names cannot contain spaces, newlines or special characters.",
            );
        }
        self.client.name = (!name.is_empty()).then(|| owned(name));
        Bytes::from_static(OK)
    }

    /// Back to a new connection's state (`RESET`).
    pub(super) fn reset_state(&mut self) {
        self.muting = Default::default();
        self.mode = Mode::Shared;
        self.enrollment.set_pubsub(false);
        let client = &mut self.client;
        client.no_evict = false;
        client.name = None;
        client.db_uncertain = false;
        client.user = None;
        client.authed = self.snapshot.open();
        client.acl = self.snapshot.users.default_user().clone();
        client.db = self.ctx.upstream.default_db();
        client.proto = Protocol::Resp2;
        self.lane.reset(self.ctx.default_pool.clone());
    }

    /// Ids the client got from nearcache (`CLIENT ID`) where a command names
    /// another client, replaced by Redis's id for the dedicated connection
    /// that client is pinned to or blocked on.
    pub(super) async fn translate_ids(&mut self, req: &mut Request<'_>) -> Result<(), ProxyError> {
        match req.route {
            Route::Relay if req.name() == "client|tracking" => self.translate_redirect(req).await,
            Route::ClientUnblock => {
                // Any id of no blocked client becomes one no Redis client
                // has, so Redis still checks the arguments and answers 0 as
                // for a stranger.
                if let Some(id) = req.argv.get(2).and_then(|a| parse_i64(a)) {
                    let redis_id = u64::try_from(id)
                        .ok()
                        .and_then(|id| self.ctx.directory.redis_id(id))
                        .unwrap_or(i64::MAX as u64);
                    req.set_arg(2, Bytes::from(redis_id.to_string()));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// `CLIENT TRACKING … REDIRECT <id>`: a client pinned to a dedicated
    /// connection by that Redis id; one on the shared connections gets one
    /// held for it (see `Directory::reserve`); an id of no client gets
    /// Redis's own error for an unknown id.
    async fn translate_redirect(&self, req: &mut Request<'_>) -> Result<(), ProxyError> {
        let mut i = 3;
        while i + 1 < req.argv.len() {
            let opt = &req.argv[i];
            if opt.eq_ignore_ascii_case(b"redirect") {
                let Some(client) = parse_i64(&req.argv[i + 1]) else {
                    // Redis judges the syntax.
                    return Ok(());
                };
                let unknown = || {
                    ProxyError::new(
                        ErrorKind::Argument,
                        "ERR The client ID you want redirect to does not exist",
                    )
                };
                let target = u64::try_from(client).map_err(|_| unknown())?;
                let id = match self.ctx.directory.redis_id(target) {
                    Some(id) => id,
                    None => self.hold_connection_for(target).await.ok_or_else(unknown)?,
                };
                req.set_arg(i + 1, Bytes::from(id.to_string()));
                return Ok(());
            }
            // PREFIX takes a value (which may read "redirect"); flags do not.
            i += if opt.eq_ignore_ascii_case(b"prefix") {
                2
            } else {
                1
            };
        }
        Ok(())
    }
}

impl Session {
    /// Holds a dedicated connection for client `target` (on its database
    /// and protocol, as nearcache's own upstream identity), for its
    /// invalidations; its Redis id, or None if there is no such client (or
    /// it runs as a Redis user of its own, whose connection nearcache cannot
    /// open for it).
    async fn hold_connection_for(&self, target: u64) -> Option<u64> {
        let (db, resp) = self.ctx.directory.whereabouts(target)?;
        let proto = if resp == 3 {
            Protocol::Resp3
        } else {
            Protocol::Resp2
        };
        // (nearcache's own users all share its upstream identity.)
        if self.ctx.cfg.server.auth == AuthMode::Redis
            && self.ctx.directory.user_of(target)? != self.ctx.anonymous_user
        {
            return None;
        }
        let key = PoolKey {
            db,
            proto,
            user: None,
        };
        let conn = self
            .ctx
            .upstream
            .pool(key)
            .await
            .ok()?
            .dedicated()
            .await
            .ok()?;
        self.ctx
            .directory
            .reserve(target, Reserved { conn, db, proto })
    }
}

/// A `CLIENT REPLY` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReplyMode {
    On,
    Off,
    Skip,
}

/// The mode `argv` sets, if it is a valid `CLIENT REPLY ON|OFF|SKIP`.
pub(super) fn reply_mode(argv: &[Bytes]) -> Option<ReplyMode> {
    let [client, reply, mode] = argv else {
        return None;
    };
    if !client.eq_ignore_ascii_case(b"client") || !reply.eq_ignore_ascii_case(b"reply") {
        return None;
    }
    const MODES: &[(&str, ReplyMode)] = &[
        ("on", ReplyMode::On),
        ("off", ReplyMode::Off),
        ("skip", ReplyMode::Skip),
    ];
    keyword(mode, MODES)
}

/// `HELLO`'s reply with the value of its `id` field replaced by `id`.
fn with_hello_id(hello: &[u8], id: u64) -> Option<Bytes> {
    const KEY: &[u8] = b"$2\r\nid\r\n:";
    let at = hello.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let end = at + hello[at..].iter().position(|&b| b == b'\r')?;
    let mut out = BytesMut::with_capacity(hello.len() + 20);
    out.extend_from_slice(&hello[..at]);
    out.extend_from_slice(id.to_string().as_bytes());
    out.extend_from_slice(&hello[end..]);
    Some(out.freeze())
}

/// The protocol a HELLO asks for, if it names a valid one.
pub(super) fn requested_protocol(argv: &[Bytes]) -> Option<Protocol> {
    match argv.get(1).and_then(|v| parse_i64(v)) {
        Some(2) => Some(Protocol::Resp2),
        Some(3) => Some(Protocol::Resp3),
        _ => None,
    }
}

/// Redis's rule: printable ASCII without spaces.
fn valid_client_name(name: &[u8]) -> bool {
    name.iter().all(|&c| (b'!'..=b'~').contains(&c))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_hello_id_replaces_only_the_id() {
        let hello =
            b"%3\r\n$6\r\nserver\r\n$5\r\nredis\r\n$2\r\nid\r\n:1234\r\n$5\r\nproto\r\n:3\r\n";
        let ours = with_hello_id(hello, 7).expect("has an id");
        assert_eq!(
            &ours[..],
            b"%3\r\n$6\r\nserver\r\n$5\r\nredis\r\n$2\r\nid\r\n:7\r\n$5\r\nproto\r\n:3\r\n"
        );
        assert_eq!(with_hello_id(b"-NOPROTO sorry\r\n", 7), None);
    }
}
