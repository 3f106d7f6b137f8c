//! What nearcache answers itself from the session's own state: `AUTH`,
//! `HELLO`, `SELECT`, `RESET` and the `CLIENT` subcommands about the
//! client's own connection (`ID`, `SETNAME`, `GETNAME`, `NO-EVICT`) or about
//! nearcache's clients (`LIST`, `INFO`, `KILL`).

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use super::{Session, owned};
use crate::protocol::parser::{keyword, parse_i64};
use crate::protocol::reply::{self, OK, Protocol, Reply};
use crate::server::client_list::{self, ListFilter};
use crate::server::directory::{KillFilter, KillForm, Profile};
use crate::server::outbox::Slot;
use crate::server::route::Route;
use crate::upstream::{Op, PoolKey, UpstreamError, encode_command};

/// Redis's answer to credentials it does not accept.
pub(super) const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

impl Session {
    pub(super) async fn select(&mut self, chunk: &Bytes, frame: Option<Range<usize>>) {
        let Some(db) = self.argv.get(1).and_then(|a| parse_i64(a)) else {
            return self.reply(reply::error("ERR value is not an integer or out of range"));
        };
        let Ok(db) = u32::try_from(db) else {
            return self.reply(reply::error("ERR DB index is out of range"));
        };
        if let Some(pin) = &mut self.pin {
            pin.dirty = true;
            if pin.in_multi {
                // Queued: it takes effect at EXEC, if at all. The keys of the
                // writes queued after it are taken in `db` (more invalidation
                // rather than less), and the unpin reads back where the
                // connection ended up.
                self.db = db;
                return self.forward(chunk, frame, true).await;
            }
            // Effective now if Redis accepts it: the writes that follow (and
            // their invalidations) are in `db` only then.
            let r = self.ask_pinned(chunk, frame).await;
            if &r[..] == OK {
                self.db = db;
            }
            return self.reply(r);
        }
        match self.switch_pool(db, self.proto).await {
            Ok(()) => self.reply(Bytes::from_static(OK)),
            Err(UpstreamError::Rejected(msg)) => self.reply(reply::error(&msg)),
            Err(e) => self.reply(e.to_reply()),
        }
    }

    pub(super) async fn switch_pool(
        &mut self,
        db: u32,
        proto: Protocol,
    ) -> Result<(), UpstreamError> {
        if self.pool.key() != (PoolKey { db, proto }) {
            self.pool = self.ctx.upstream.pool(PoolKey { db, proto }).await?;
            self.conn = None;
        }
        self.db = db;
        self.proto = proto;
        Ok(())
    }

    pub(super) fn auth(&mut self) -> Bytes {
        let (user, pass) = match &self.argv[1..] {
            [pass] => (None, pass),
            [user, pass] => (Some(user), pass),
            _ => return reply::error("ERR syntax error"),
        };
        let default_user = user.is_none_or(|u| &u[..] == b"default");
        let Some(expected) = &self.ctx.cfg.server.password else {
            // As Redis's `default` user without a password (`nopass`): it
            // takes any password when named, so clients configured with
            // credentials still connect; the one-argument form is refused.
            return match user {
                None => reply::error(
                    "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
                ),
                Some(_) if default_user => {
                    self.authed = true;
                    Bytes::from_static(OK)
                }
                Some(_) => reply::error(WRONGPASS),
            };
        };
        if !default_user || !constant_time_eq(pass, expected.as_bytes()) {
            return reply::error(WRONGPASS);
        }
        self.authed = true;
        Bytes::from_static(OK)
    }

    pub(super) async fn hello(&mut self) -> Bytes {
        let mut proto = self.proto;
        let args = &self.argv[1..];
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
                auth = Some((args[i + 1].clone(), args[i + 2].clone()));
                i += 3;
            } else if opt.eq_ignore_ascii_case(b"setname") && args.len() > i + 1 {
                name = Some(args[i + 1].clone());
                i += 2;
            } else {
                return reply::error(&format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(opt)
                ));
            }
        }
        if let Some((user, pass)) = auth {
            self.argv.truncate(1);
            self.argv.push(user);
            self.argv.push(pass);
            let r = self.auth();
            if &r[..] != OK {
                return r;
            }
        }
        if !self.authed {
            return reply::error(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
            );
        }
        if let Some(name) = name {
            if !valid_client_name(&name) {
                return reply::error(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                );
            }
            self.name = (!name.is_empty()).then(|| owned(&name));
        }
        if let Err(e) = self.switch_pool(self.db, proto).await {
            return e.to_reply();
        }
        let version = self.ctx.upstream.server_version();
        let mut r = Reply::new(proto);
        r.map(7);
        r.bulk(b"server").bulk(b"redis");
        r.bulk(b"version").bulk(version.as_bytes());
        r.bulk(b"proto").int(proto.version());
        r.bulk(b"id").int(self.id as i64);
        r.bulk(b"mode").bulk(b"standalone");
        r.bulk(b"role").bulk(b"master");
        r.bulk(b"modules").array(0);
        r.finish()
    }

    /// The reply to a command nearcache answers itself, from the session's
    /// state (the command is in `argv`).
    pub(super) async fn local_reply(&mut self, route: Route) -> Bytes {
        match route {
            Route::Auth => self.auth(),
            Route::ClientSetName => self.set_name(),
            Route::ClientGetName => {
                let mut r = Reply::new(self.proto);
                match &self.name {
                    Some(name) => r.bulk(name),
                    None => r.null(),
                };
                r.finish()
            }
            Route::ClientId => {
                let mut r = Reply::new(self.proto);
                r.int(self.id as i64);
                r.finish()
            }
            Route::ClientKill => self.client_kill(),
            Route::ClientList => self.client_list(false).await,
            // Only ON and bad modes are queued (see `handle`); ON's reply is
            // an element of EXEC's, and replies come back on from it.
            Route::ClientReply => match reply_mode(&self.argv) {
                Some(ReplyMode::On) => {
                    self.reply_off = false;
                    Bytes::from_static(OK)
                }
                _ => reply::error("ERR syntax error"),
            },
            Route::ClientInfo => self.client_list(true).await,
            // Redis never evicts a client of nearcache: there is nothing to
            // protect, and the shared connection must not carry the flag.
            // (Shown as the `e` flag in CLIENT LIST, as Redis shows it.)
            Route::ClientNoEvict => match self.argv.get(2) {
                Some(v) if v.eq_ignore_ascii_case(b"on") || v.eq_ignore_ascii_case(b"off") => {
                    self.no_evict = v.eq_ignore_ascii_case(b"on");
                    Bytes::from_static(OK)
                }
                _ => reply::error("ERR syntax error"),
            },
            Route::Refuse(msg) => reply::error(msg),
            Route::WrongArity(name) => reply::error(&format!(
                "ERR wrong number of arguments for '{name}' command"
            )),
            _ => reply::error("ERR internal: not a command nearcache answers"),
        }
    }

    /// `CLIENT KILL`: closes nearcache's clients that match, never the
    /// upstream connections they share (Redis's view, where `TYPE normal`
    /// would take every client's requests in flight down with them).
    pub(super) fn client_kill(&mut self) -> Bytes {
        let (filter, form) = match KillFilter::parse(self.argv.get(2..).unwrap_or_default()) {
            Ok(parsed) => parsed,
            Err(e) => return reply::error(&e),
        };
        let (killed, me) = self.ctx.directory.kill(&filter, self.id);
        self.closing |= me;
        match form {
            KillForm::Old if killed == 0 => reply::error("ERR No such client"),
            KillForm::Old => Bytes::from_static(OK),
            KillForm::Filters => {
                let mut r = Reply::new(self.proto);
                r.int(killed as i64);
                r.finish()
            }
        }
    }

    /// `CLIENT LIST` (or `CLIENT INFO`, the caller's line alone): nearcache's
    /// clients, with Redis's state of the dedicated connections some are
    /// pinned to (see `client_list.rs`).
    pub(super) async fn client_list(&mut self, info: bool) -> Bytes {
        let filter = if info {
            ListFilter::Ids(vec![self.id as i64])
        } else {
            match ListFilter::parse(self.argv.get(2..).unwrap_or_default()) {
                Ok(filter) => filter,
                Err(e) => return reply::error(&e),
            }
        };
        // Earlier commands of this batch may have changed what it shows.
        self.publish_profile();
        let directory = self.ctx.directory.clone();
        let clients = directory.clients();
        let picked = filter.select(&clients);
        let pinned: Vec<u64> = picked.iter().filter_map(|c| c.redis_id).collect();
        let theirs = if pinned.is_empty() {
            None
        } else {
            self.redis_client_list(&pinned).await
        };
        let redis = theirs
            .as_deref()
            .and_then(client_list::text_of)
            .map(client_list::redis_lines)
            .unwrap_or_default();
        // (Queued in a transaction, the command running is EXEC.)
        let caller = client_list::Caller {
            id: self.id,
            cmd: self.last_cmd,
        };
        let text = client_list::render(&picked, &filter, &redis, caller, |r| {
            directory.session_of(r)
        });
        let mut r = Reply::new(self.proto);
        r.text(text.as_bytes());
        r.finish()
    }

    /// Redis's `CLIENT LIST ID …` reply for the connections `ids`, over a
    /// shared connection; None if Redis cannot say (the lines then show
    /// what nearcache knows).
    pub(super) async fn redis_client_list(&self, ids: &[u64]) -> Option<Bytes> {
        let mut argv = vec![
            Bytes::from_static(b"CLIENT"),
            Bytes::from_static(b"LIST"),
            Bytes::from_static(b"ID"),
        ];
        argv.extend(ids.iter().map(|id| Bytes::from(id.to_string())));
        let conn = self.pool.shared().await.ok()?;
        let (op, rx) = Op::request(encode_command(&argv), 1, false);
        conn.send(op).ok()?;
        rx.await.ok()?.ok()
    }

    /// Publishes what `CLIENT LIST` shows of this session, if it changed.
    pub(super) fn publish_profile(&mut self) {
        let shown = &self.shown;
        let changed = shown.db != self.db
            || shown.resp != self.proto.version()
            || shown.no_evict != self.no_evict
            || !std::ptr::eq(shown.cmd, self.last_cmd)
            || shown.name != self.name;
        if changed {
            self.shown = Profile {
                name: self.name.clone(),
                db: self.db,
                resp: self.proto.version(),
                no_evict: self.no_evict,
                cmd: self.last_cmd,
            };
            self.enrollment.publish(&self.shown);
        }
    }

    pub(super) fn set_name(&mut self) -> Bytes {
        let Some(name) = self.argv.get(2) else {
            return reply::error("ERR wrong number of arguments for 'client|setname' command");
        };
        if !valid_client_name(name) {
            return reply::error(
                "ERR Client names cannot contain spaces, newlines or special characters.",
            );
        }
        self.name = (!name.is_empty()).then(|| owned(name));
        Bytes::from_static(OK)
    }

    /// A SUBSCRIBE of any kind makes the client `pubsub` for `CLIENT KILL
    /// TYPE` (until RESET: unsubscribing from everything is not tracked).
    pub(super) fn note_subscribe(&self) {
        let name = &self.argv[0];
        if [&b"subscribe"[..], b"psubscribe", b"ssubscribe"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
        {
            self.enrollment.set_pubsub(true);
        }
    }

    /// `CLIENT REPLY ON|OFF|SKIP` outside a relay: nearcache drops the
    /// replies itself, so Redis still answers every command and writes are
    /// acknowledged (invalidated, published) as usual.
    pub(super) fn client_reply(&mut self) {
        match reply_mode(&self.argv) {
            Some(ReplyMode::On) => {
                if std::mem::take(&mut self.reply_off) {
                    self.push(Slot::Mute(false));
                }
                self.reply(Bytes::from_static(OK));
            }
            Some(ReplyMode::Off) => {
                if !std::mem::replace(&mut self.reply_off, true) {
                    self.push(Slot::Mute(true));
                }
            }
            // (Under OFF, Redis ignores it.)
            Some(ReplyMode::Skip) => self.skip_next = !self.reply_off,
            None => self.reply(reply::error("ERR syntax error")),
        }
    }

    pub(super) async fn reset_state(&mut self) {
        self.reply_off = false;
        self.skip_next = false;
        self.relay = Default::default();
        self.enrollment.set_pubsub(false);
        self.no_evict = false;
        self.name = None;
        self.authed = self.ctx.cfg.server.password.is_none();
        self.pool = self.ctx.default_pool.clone();
        self.db = self.ctx.upstream.default_db();
        self.proto = Protocol::Resp2;
        self.conn = None;
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
pub(super) fn with_hello_id(hello: &[u8], id: u64) -> Option<Bytes> {
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
pub(super) fn valid_client_name(name: &[u8]) -> bool {
    name.iter().all(|&c| (b'!'..=b'~').contains(&c))
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
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
