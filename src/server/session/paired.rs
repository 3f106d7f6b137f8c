//! Dispatch where replies pair with commands: on the shared connections
//! (where L1 serves reads), pinned by `WATCH`, and — for what a transaction
//! does not handle itself — inside `MULTI`.

use bytes::Bytes;

use super::mode::Mode;
use super::{Flow, Request, Session};
use crate::error::ProxyError;
use crate::protocol::reply::{self, OK, Reply};
use crate::server::outbox::Slot;
use crate::server::route::Route;

impl Session {
    /// Handles a command in [`Mode::Shared`] or [`Mode::Pinned`] (and what
    /// [`Mode::Transaction`] passes on).
    pub(super) async fn paired(&mut self, req: &mut Request<'_>) -> Flow {
        match req.route {
            Route::Forward => self.forward_or_serve(req).await,
            Route::Script => self.forward(req).await,
            Route::Proxy => {
                let r = if req.argv.len() == 2 && req.argv[1].eq_ignore_ascii_case(b"reload") {
                    self.reload().await
                } else {
                    crate::admin::proxy_command(&req.argv, &self.ctx, self.client.proto)
                };
                self.answer(req, r).await;
            }
            Route::Quit => {
                self.out.put_bytes(Bytes::from_static(OK));
                return self.close();
            }
            // (Route::answered_locally, spelled out for the exhaustive match.)
            Route::Auth
            | Route::ClientSetName
            | Route::ClientGetName
            | Route::ClientGetRedir
            | Route::ClientId
            | Route::ClientKill
            | Route::ClientNoEvict
            | Route::ClientList
            | Route::ClientInfo
            | Route::AclWhoami => return self.local(req).await,
            Route::Hello => self.hello(req).await,
            Route::Info => self.info(req).await,
            Route::Select => self.select(req).await,
            // (Its id is translated already.)
            Route::ClientUnblock => self.forward(req).await,
            Route::Reset => self.reset(req).await,
            Route::Multi | Route::Watch => self.begin_transaction(req).await,
            Route::EndTransaction | Route::Unwatch => return self.end_transaction(req).await,
            Route::Blocking | Route::Wait if self.mode.pinned() => self.blocking_pinned(req).await,
            Route::Blocking => self.blocking(req).await,
            Route::Wait => self.wait(req).await,
            Route::ClientReply => self.client_reply(req),
            Route::Relay => self.start_relay(req).await,
            Route::Refuse(msg) => self.refuse(ProxyError::unsupported(msg)).await,
            Route::WrongArity(name) => self.refuse(ProxyError::wrong_arity(name)).await,
        }
        Flow::Continue
    }

    /// A plain command: served from L1 if it is a cacheable read, else
    /// forwarded (with the rule's `upstream_ttl` added to a `SET` that sets
    /// no expiry).
    async fn forward_or_serve(&mut self, req: &mut Request<'_>) {
        if self.cached_read(req).await {
            return;
        }
        if let Err(e) = self.limit_upstream(req).await {
            return self.refuse(e).await;
        }
        if self.ctx.l1.is_some() {
            if let Some(set) = super::cached::with_upstream_ttl(&self.snapshot.rules, &req.argv) {
                req.replace(set);
            }
        }
        self.forward(req).await;
    }

    /// `PROXY RELOAD`: the configuration file read again (see
    /// [`crate::reload`]); what takes a restart is said in the reply.
    async fn reload(&mut self) -> Bytes {
        match crate::reload::reload(&self.ctx, "PROXY RELOAD").await {
            Ok(done) if done.restart_needed.is_empty() => Bytes::from_static(OK),
            Ok(done) => {
                let mut r = Reply::new(self.client.proto);
                r.simple(&format!(
                    "OK reloaded; these changes take a restart: {}",
                    done.restart_needed.join(", ")
                ));
                r.finish()
            }
            Err(e) => reply::error(&format!("ERR reload failed: {}", e.one_line())),
        }
    }

    /// `RESET`: back to a fresh connection's state; a pin is closed.
    async fn reset(&mut self, req: &Request<'_>) {
        self.flush_run().await;
        self.mode = Mode::Shared;
        // (Replies come back on; after SKIP, RESET's own stays dropped, as
        // in Redis.)
        if std::mem::take(&mut self.muting.off) {
            self.out.push(Slot::Mute(false));
        }
        self.reset_state();
        self.answer(req, Bytes::from_static(b"+RESET\r\n")).await;
    }
}
