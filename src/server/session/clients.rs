//! The `CLIENT` subcommands about nearcache's clients: `LIST` and `INFO`
//! (nearcache's clients, with Redis's state of the dedicated connections
//! some are pinned to) and `KILL` (closes nearcache's clients, never the
//! upstream connections they share); and what the session publishes about
//! itself for them.

use bytes::Bytes;

use super::Session;
use super::mode::Mode;
use crate::config::AuthMode;
use crate::protocol::reply::{self, OK, Reply};
use crate::server::client_list::{self, ListFilter};
use crate::server::directory::{KillFilter, KillForm, Profile};
use crate::upstream::{OnAnswer, Op, encode_command};

impl Session {
    /// `CLIENT KILL`: closes nearcache's clients that match (Redis's view,
    /// where `TYPE normal` would take every client's requests in flight
    /// down with them, is never asked).
    pub(super) fn client_kill(&mut self, argv: &[Bytes]) -> Bytes {
        let known = |user: &[u8]| match self.ctx.cfg.server.auth {
            AuthMode::Proxy => user == b"default",
            AuthMode::Redis => user == b"default" || self.ctx.upstream.knows_user(user),
        };
        let (filter, form) = match KillFilter::parse(argv.get(2..).unwrap_or_default(), known) {
            Ok(parsed) => parsed,
            Err(e) => return reply::error(&e),
        };
        let (killed, me) = self.ctx.directory.kill(&filter, self.client.id);
        self.client.closing |= me;
        match form {
            KillForm::Old if killed == 0 => reply::error("ERR No such client"),
            KillForm::Old => Bytes::from_static(OK),
            KillForm::Filters => {
                let mut r = Reply::new(self.client.proto);
                r.int(killed as i64);
                r.finish()
            }
        }
    }

    /// `CLIENT LIST` (or `CLIENT INFO`, the caller's line alone), rendered by
    /// `client_list.rs`.
    pub(super) async fn client_list(&mut self, argv: &[Bytes], info: bool) -> Bytes {
        let filter = if info {
            ListFilter::Ids(vec![self.client.id as i64])
        } else {
            match ListFilter::parse(argv.get(2..).unwrap_or_default()) {
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
            id: self.client.id,
            cmd: self.client.last_cmd,
        };
        let text = client_list::render(&picked, &filter, &redis, caller, |r| {
            directory.session_of(r)
        });
        let mut r = Reply::new(self.client.proto);
        r.text(text.as_bytes());
        r.finish()
    }

    /// `CLIENT GETREDIR`: -1 without tracking (which only a relay has), else
    /// what Redis reports for the relay's connection (0: no redirect), with
    /// a redirect by the id its client got from `CLIENT ID`. Asked once the
    /// commands relayed before it are answered (a `CLIENT TRACKING` among
    /// them must have run).
    pub(super) async fn client_getredir(&mut self) -> Bytes {
        let Mode::Relay(pin, book) = &self.mode else {
            return int_reply(self.client.proto, -1);
        };
        let redis_id = pin.conn.redis_id();
        if book.countable {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let answered = OnAnswer::new(move || {
                let _ = tx.send(());
            });
            if pin.conn.send(Op::Ack(answered)).is_ok() {
                let _ = rx.await;
            }
        }
        let redir = self
            .redis_client_list(&[redis_id])
            .await
            .as_deref()
            .and_then(client_list::text_of)
            .and_then(|text| {
                let at = text.find(" redir=")? + " redir=".len();
                let end = text[at..].find([' ', '\n']).map_or(text.len(), |e| at + e);
                text[at..end].parse::<i64>().ok()
            })
            .unwrap_or(-1);
        let ours = match u64::try_from(redir) {
            Ok(id) if id > 0 => self
                .ctx
                .directory
                .session_of(id)
                .map_or(redir, |s| s as i64),
            _ => redir,
        };
        int_reply(self.client.proto, ours)
    }

    /// Redis's `CLIENT LIST ID …` reply for the connections `ids`, over a
    /// shared connection (unordered with the session's own commands: it is
    /// about other connections); None if Redis cannot say (the lines then
    /// show what nearcache knows).
    async fn redis_client_list(&self, ids: &[u64]) -> Option<Bytes> {
        let mut argv = vec![
            Bytes::from_static(b"CLIENT"),
            Bytes::from_static(b"LIST"),
            Bytes::from_static(b"ID"),
        ];
        argv.extend(ids.iter().map(|id| Bytes::from(id.to_string())));
        let conn = self.lane.pool().shared().await.ok()?;
        let (op, rx) = Op::request(encode_command(&argv), 1, false);
        conn.send(op).ok()?;
        rx.await.ok()?.ok()
    }

    /// Publishes what `CLIENT LIST` shows of this session, if it changed.
    pub(super) fn publish_profile(&mut self) {
        let (shown, c) = (&self.shown, &self.client);
        let user = self.user_arc();
        let changed = shown.db != c.db
            || shown.resp != c.proto.version()
            || shown.no_evict != c.no_evict
            || !std::ptr::eq(shown.cmd, c.last_cmd)
            || shown.name != c.name
            || !std::sync::Arc::ptr_eq(&shown.user, user);
        if changed {
            self.shown = Profile {
                name: c.name.clone(),
                db: c.db,
                resp: c.proto.version(),
                no_evict: c.no_evict,
                cmd: c.last_cmd,
                user: user.clone(),
            };
            self.enrollment.publish(&self.shown);
        }
    }
}

/// An integer reply.
fn int_reply(proto: crate::protocol::Protocol, n: i64) -> Bytes {
    let mut r = Reply::new(proto);
    r.int(n);
    r.finish()
}
