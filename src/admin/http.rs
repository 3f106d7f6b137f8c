//! The admin HTTP listener (`admin.listen`): the dashboard at `/`,
//! `/healthz`, `/readyz`, `/metrics`, `/stats`. It runs on the proxy's runtime as one more task and
//! only reads `Context` (atomics, and the rules' snapshot), so a scrape never
//! takes a lock the request path holds.
//!
//! `admin.token`, when set, is required as `Authorization: Bearer <token>`
//! on everything but `/healthz`, which a load balancer or kubelet probes
//! without credentials. `/` also takes it as `/?token=…`, since a browser
//! cannot set a header on a page load (see [`super::dashboard`]).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::context::Context;

/// What every handler reads.
#[derive(Clone)]
struct Admin {
    ctx: Arc<Context>,
    /// True once the proxy has begun its graceful shutdown.
    draining: watch::Receiver<bool>,
}

/// Serves the admin endpoints on `listener` until the task is aborted (the
/// proxy does so once its sessions have drained, so `/readyz` answers
/// "draining" meanwhile).
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, draining: watch::Receiver<bool>) {
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/stats", get(stats))
        .with_state(Admin { ctx, draining });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin listener failed");
    }
}

/// Whether the request carries the configured token (always, if none is).
fn authorized(admin: &Admin, headers: &HeaderMap) -> bool {
    let Some(token) = admin.ctx.cfg.admin.token.as_deref() else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|g| same_token(g, token))
}

/// Constant time in the token's length: no early exit on the first
/// differing byte.
fn same_token(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "admin.token required: Authorization: Bearer <token>\n",
    )
        .into_response()
}

/// The dashboard page: the header as everywhere, or `?token=` (a browser
/// cannot set a header on a page load). Never cached or sent on as a
/// referrer, since the address may hold the token.
async fn dashboard(State(admin): State<Admin>, headers: HeaderMap, uri: Uri) -> Response {
    let by_query = || {
        let token = admin.ctx.cfg.admin.token.as_deref();
        let given = uri.query().and_then(super::dashboard::query_token);
        matches!((token, given), (Some(t), Some(g)) if same_token(&g, t))
    };
    if !authorized(&admin, &headers) && !by_query() {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "admin.token required: open /?token=<token>\n",
        )
            .into_response();
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, super::dashboard::CSP),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        super::dashboard::PAGE.as_str(),
    )
        .into_response()
}

/// 200 while the process serves.
async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 when the proxy can serve: the upstream reachable, the bus connected
/// (or its loss policy still lets L1 serve), not draining; 503 otherwise.
/// The JSON body says which check failed.
async fn readyz(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    if !authorized(&admin, &headers) {
        return unauthorized();
    }
    let readiness = super::readiness(&admin.ctx, *admin.draining.borrow());
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(readiness.to_json())).into_response()
}

/// The Prometheus text exposition.
async fn metrics(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    if !authorized(&admin, &headers) {
        return unauthorized();
    }
    match super::metrics::encode(&admin.ctx) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
    }
}

/// What `PROXY STATS` shows, as JSON.
async fn stats(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    if !authorized(&admin, &headers) {
        return unauthorized();
    }
    let mut body = super::stats_json(&admin.ctx);
    if let Some(obj) = body.as_object_mut() {
        let r = super::readiness(&admin.ctx, *admin.draining.borrow());
        obj.insert("ready".into(), json!(r.to_json()));
        super::dashboard_stats(&admin.ctx, obj);
    }
    axum::Json(body).into_response()
}
