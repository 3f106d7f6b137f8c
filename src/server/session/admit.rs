//! Admission: whether a command may run now — authentication, then the rate
//! limits. A refusal is the caller's to deliver ([`Session::refuse`]), so it
//! lands where the mode needs it (a queued refusal inside MULTI makes EXEC
//! abort; in a relay it takes its place among Redis's replies).
//!
//! Limits that count only what goes to Redis cannot decide before L1 has
//! had its say: for a command L1 may answer, they are checked again at
//! [`Stage::Upstream`], on the miss (`cached.rs`) or when L1 passes it on
//! (`paired.rs`).

use std::sync::Arc;
use std::time::Duration;

use super::mode::Mode;
use super::{ClientState, Request, Session};
use crate::acl::{self, Renamed, unknown_command};
use crate::context::Snapshot;
use crate::error::{ErrorKind, ProxyError};
use crate::limits::{Decision, Stage, Who};
use crate::server::route::Route;

impl Session {
    /// `server.rename`, `server.deny`, then the user's permissions.
    fn fence(&mut self, req: &Request<'_>) -> Result<(), ProxyError> {
        if req.renamed == Renamed::Hidden {
            return Err(ProxyError::new(
                ErrorKind::Denied,
                unknown_command(&req.argv),
            ));
        }
        let snapshot = &self.snapshot;
        if snapshot.fence.denied(req.spec) {
            return Err(ProxyError::new(
                ErrorKind::Denied,
                format!("ERR '{}' is denied by this proxy (server.deny)", req.name()),
            ));
        }
        let exempt = matches!(
            req.route,
            Route::Auth | Route::Hello | Route::Quit | Route::Reset | Route::WrongArity(_)
        );
        if snapshot.users.enforced && !exempt {
            let proxy = req.route == Route::Proxy;
            acl::check(
                &self.client.acl,
                req.spec,
                proxy,
                &req.argv,
                &mut self.scratch.acl_keys,
            )
            .map_err(|text| ProxyError::new(ErrorKind::Denied, text))?;
        }
        Ok(())
    }

    /// The user the client is, as `CLIENT LIST` and `ACL WHOAMI` name it:
    /// the Redis user it authenticated as where Redis decides, the
    /// nearcache user where `[[users]]` decide, else the anonymous one.
    pub(super) fn user_arc(&self) -> &Arc<str> {
        user_of(&self.client, &self.snapshot, &self.ctx.anonymous_user)
    }

    /// [`Session::user_arc`] as text.
    pub(super) fn user_name(&self) -> &str {
        self.user_arc()
    }

    /// Whether the command may run now (after a delay, for a limit that
    /// delays).
    pub(super) async fn admit(&mut self, req: &Request<'_>) -> Result<(), ProxyError> {
        let before_auth = matches!(
            req.route,
            Route::Auth | Route::Hello | Route::Quit | Route::Reset
        );
        if !self.client.authed && !before_auth {
            return Err(ProxyError::no_auth());
        }
        self.fence(req)?;
        if self.snapshot.limits.is_empty() || matches!(req.route, Route::Proxy | Route::Quit) {
            // (The operator's own commands, and leaving, are never limited.)
            return Ok(());
        }
        let upstream_later = req.route == Route::Forward && !matches!(self.mode, Mode::Relay(..));
        self.limit(req, Stage::Admission { upstream_later }).await
    }

    /// Takes the command's cost from every limit that counts it at `stage`,
    /// in file order; delays or refuses as the first limit over its rate
    /// says. Delaying holds this session's later commands (order is kept),
    /// no one else's.
    pub(super) async fn limit(
        &mut self,
        req: &Request<'_>,
        stage: Stage,
    ) -> Result<(), ProxyError> {
        let mut i = 0;
        let mut waited = Duration::ZERO;
        while i < self.snapshot.limits.len() {
            let limits = &self.snapshot.limits;
            let limit = limits.get(i);
            let Some(pattern) = limit.applies(stage, req.spec, &req.argv) else {
                i += 1;
                continue;
            };
            let cost = limit.cost(|| req.len());
            let who = Who {
                ip: self.ip,
                name: self.client.name.as_deref(),
                user: user_of(&self.client, &self.snapshot, &self.ctx.anonymous_user),
            };
            let bucket = self.buckets.get(limits, i, who, req.spec, pattern);
            let decision = limit.check(bucket, cost);
            let wait = match decision {
                Decision::Pass => {
                    limit
                        .stats
                        .allowed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    waited = Duration::ZERO;
                    i += 1;
                    continue;
                }
                Decision::Wait(wait) if limit.max_wait().is_some_and(|m| waited + wait <= m) => {
                    wait
                }
                Decision::Wait(_) | Decision::Never => {
                    limit
                        .stats
                        .rejected
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Err(limit.refusal(decision));
                }
            };
            if waited.is_zero() {
                limit
                    .stats
                    .delayed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // What was read before it goes now; only what follows waits.
                self.flush_run().await;
            }
            // (At least a millisecond: the timer's grain.)
            let wait = wait.max(Duration::from_millis(1));
            tokio::time::sleep(wait).await;
            waited += wait;
        }
        Ok(())
    }
}

/// [`Session::user_arc`], from the fields it needs (so that the caller may
/// borrow others mutably).
fn user_of<'a>(
    client: &'a ClientState,
    snapshot: &'a Snapshot,
    anonymous: &'a Arc<str>,
) -> &'a Arc<str> {
    match &client.user {
        Some(credentials) => &credentials.user,
        None if snapshot.users.enforced => &client.acl.name,
        None => anonymous,
    }
}
