//! HTTP: the router, admin authentication, and the two API surfaces over one [`KeyService`].
//!
//! * [`clerk`]: the primary REST API, compatible with Clerk's Backend API for API keys, under
//!   `/v1` and (for Clerk's SDK, which omits the version) at the root.
//! * [`tutorial`]: the five calls of the Clerk tutorial our users start from, at its exact paths.
//! * `GET /v1/audit_log` (admin).
//! * [`ingest`]: `POST /v1/usage`, the edge's usage reports, authenticated by HMAC signature
//!   instead of an admin token.
//! * `GET /healthz` (database and KV publisher backlog) and `GET /metrics` (Prometheus), open.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AdminToken;
use crate::publish::PublisherStatus;
use crate::service::{KeyService, limits};
use error::{ApiError, Clerk, Envelope, Tutorial};

pub mod clerk;
pub mod error;
pub mod extract;
pub mod ingest;
pub mod tutorial;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The key service.
    pub service: Arc<KeyService>,
    /// Accepted admin tokens (digests only).
    pub admin_tokens: Arc<[AdminToken]>,
    /// The KV publisher's counters, for `/healthz` and `/metrics`.
    pub publisher: Arc<PublisherStatus>,
    /// Verifies the edge's usage reports; `None` when `USAGE_SIGNING_SECRET` is unset.
    pub usage_ingest: Option<Arc<ingest::UsageIngest>>,
}

/// The admin who made a request, by the non-secret label of their token.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let clerk_api = clerk::routes().route("/audit_log", get(clerk::audit_log));
    Router::new()
        .nest("/v1", admin::<Clerk>(clerk_api, &state))
        .merge(admin::<Clerk>(clerk::routes(), &state))
        .merge(admin::<Tutorial>(tutorial::routes(), &state))
        .route("/v1/usage", post(ingest::usage))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limits::BODY_MAX_BYTES))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// Puts admin authentication in front of every route of `routes`.
fn admin<E: Envelope>(routes: Router<AppState>, state: &AppState) -> Router<AppState> {
    routes.route_layer(middleware::from_fn_with_state(
        state.admin_tokens.clone(),
        require_admin::<E>,
    ))
}

/// Requires exactly one `Authorization: Bearer <token>` header naming a configured admin token.
/// Every configured token is compared, in constant time, so timing reveals nothing.
async fn require_admin<E: Envelope>(
    State(tokens): State<Arc<[AdminToken]>>,
    mut req: Request,
    next: Next,
) -> Response {
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return ApiError::<E>::unauthorized(
            "Send exactly one `Authorization: Bearer <admin token>` header.",
        )
        .into_response();
    };
    let presented = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let Some(presented) = presented else {
        return ApiError::<E>::unauthorized(
            "The Authorization header must be `Bearer <admin token>`.",
        )
        .into_response();
    };
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut matched: Option<&AdminToken> = None;
    for token in tokens.iter() {
        if bool::from(token.digest().ct_eq(&digest)) {
            matched = Some(token);
        }
    }
    match matched {
        Some(token) => {
            req.extensions_mut().insert(Actor(token.label().to_owned()));
            next.run(req).await
        }
        None => ApiError::<E>::unauthorized("The admin token is not valid.").into_response(),
    }
}

/// Logs method, path, status and latency. Never headers, query strings or bodies: they can
/// carry secrets.
async fn log_request(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = next.run(req).await;
    tracing::info!(
        %method,
        path = %path.chars().take(200).collect::<String>(),
        status = response.status().as_u16(),
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    response
}

/// Liveness of the database, and the KV publisher's backlog (`pending`, `lag_ms`). A backlog
/// does not make origin unhealthy: it keeps serving while KV is away.
async fn healthz(State(state): State<AppState>) -> Response {
    let store = state.service.store();
    let checked = match store.ping().await {
        Ok(()) => state.publisher.report(store).await,
        Err(error) => Err(error),
    };
    match checked {
        Ok(publisher) => Json(json!({ "status": "ok", "kv_publisher": publisher })).into_response(),
        Err(error) => {
            tracing::error!(%error, "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "unavailable" })),
            )
                .into_response()
        }
    }
}

/// The publisher's figures in the Prometheus text format.
async fn metrics(State(state): State<AppState>) -> Response {
    let store = state.service.store();
    let report = match state.publisher.report(store).await {
        Ok(report) => report,
        Err(error) => {
            tracing::error!(%error, "metrics: cannot read the outbox");
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    };
    #[allow(
        clippy::cast_precision_loss,
        reason = "a lag in seconds needs no 53-bit precision"
    )]
    let lag_seconds = report.lag_ms as f64 / 1000.0;
    let body = format!(
        "# HELP latchkey_kv_outbox_pending Key changes not yet published to Workers KV.\n\
         # TYPE latchkey_kv_outbox_pending gauge\n\
         latchkey_kv_outbox_pending {}\n\
         # HELP latchkey_kv_outbox_lag_seconds Age of the oldest unpublished key change.\n\
         # TYPE latchkey_kv_outbox_lag_seconds gauge\n\
         latchkey_kv_outbox_lag_seconds {lag_seconds:.3}\n\
         # HELP latchkey_kv_published_total Key states written to Workers KV since start.\n\
         # TYPE latchkey_kv_published_total counter\n\
         latchkey_kv_published_total {}\n\
         # HELP latchkey_kv_publish_failures_total Failed (and retried) KV writes since start.\n\
         # TYPE latchkey_kv_publish_failures_total counter\n\
         latchkey_kv_publish_failures_total {}\n",
        report.pending, report.published, report.failures
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn not_found() -> ApiError<Clerk> {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "resource_not_found",
        "There is no such route.",
    )
}

async fn method_not_allowed() -> ApiError<Clerk> {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "This route does not accept that method.",
    )
}
