//! HTTP: the router, admin authentication, and the two API surfaces over one [`KeyService`].
//!
//! Every route is added in one function, `table`, through [`routes::Routes`], which records who may call it
//! ([`routes::Access`]); admin routes are guarded by [`admin::require_admin`].
//!
//! * [`clerk`]: the primary REST API, compatible with Clerk's Backend API for API keys, under
//!   `/v1` and (for Clerk's SDK, which omits the version) at the root.
//! * [`tutorial`]: the five calls of the Clerk tutorial our users start from, at its exact paths.
//! * `GET /v1/audit_log` (admin).
//! * [`ingest`]: `POST /v1/usage`, the edge's usage reports, authenticated by HMAC signature
//!   instead of an admin token.
//! * [`github`]: `POST /v1/secret_scanning/github`, GitHub's secret scanning alerts,
//!   authenticated by GitHub's ECDSA signature.
//! * `GET /healthz` (database, KV publisher and ledger backlogs) and `GET /metrics`
//!   (Prometheus), open: counts and states only, never an error's text.
//! * `GET /v1/status` (admin): the same, with the publishers' last errors in full.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use serde_json::json;

use crate::config::AdminToken;
use crate::ledger::LedgerStatus;
use crate::publish::PublisherStatus;
use crate::service::{KeyService, limits};
use admin::AdminGuard;
use error::{ApiError, Clerk};
use extract::BodyDeadline;
use routes::{RouteInfo, Routes};

pub mod admin;
pub mod clerk;
pub mod client;
pub mod error;
pub mod extract;
pub mod github;
pub mod ingest;
pub mod routes;
pub mod tutorial;

/// What every handler can reach. Cloned for every request (axum's `State`), so it is one `Arc`.
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl From<AppParts> for AppState {
    fn from(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;
    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct AppParts {
    /// The key service.
    pub service: Arc<KeyService>,
    /// Accepted admin tokens (digests only).
    pub admin_tokens: Arc<[AdminToken]>,
    /// The KV publisher's counters, for `/healthz` and `/metrics`.
    pub publisher: Arc<PublisherStatus>,
    /// The ledger publisher's counters, for `/healthz` and `/metrics`.
    pub ledger: Arc<LedgerStatus>,
    /// Verifies the edge's usage reports; `None` when `USAGE_SIGNING_SECRET` is unset.
    pub usage_ingest: Option<Arc<ingest::UsageIngest>>,
    /// Failed admin authentications allowed per client address and minute.
    pub admin_auth_failures_per_minute: u32,
    /// Proxies whose `X-Forwarded-For` names the client (for the failed-authentication limit).
    pub trusted_proxies: client::TrustedProxies,
    /// How long a request body may take to arrive.
    pub request_read_timeout: std::time::Duration,
    /// GitHub's secret scanning keys; `None` turns `POST /v1/secret_scanning/github` off.
    pub github: Option<Arc<crate::secret_scanning::GithubKeys>>,
    /// What a leak report does to the key (`LEAK_ACTION`).
    pub leak_action: crate::service::LeakAction,
    /// The event webhooks' counters, for `/healthz` and `/metrics`.
    pub webhooks: Arc<crate::webhook::WebhookStatus>,
}

/// The admin who made a request, by the non-secret label of their token.
#[derive(Debug, Clone)]
pub struct Actor(pub Arc<str>);

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let guard = AdminGuard::new(
        state.admin_tokens.clone(),
        state.admin_auth_failures_per_minute,
        state.trusted_proxies.clone(),
    );
    let (routes, _) = table(guard).finish();
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limits::BODY_MAX_BYTES))
        .layer(Extension(BodyDeadline(state.request_read_timeout)))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// Parses `bytes` as every JSON request body of the API and, if it is UTF-8, as a query
/// string, exactly as the handlers would; returns how many parsers accepted it. For the
/// `origin_body` fuzz target: whatever the bytes, this must not panic.
#[doc(hidden)]
pub fn parse_request_bodies(bytes: &[u8]) -> usize {
    let query = std::str::from_utf8(bytes).ok().map_or(0, |q| {
        usize::from(extract::query_pairs::<Clerk>(Some(q)).is_ok())
    });
    clerk::parse_bodies(bytes) + tutorial::parse_bodies(bytes) + query
}

/// Every route, its method and who may call it (what `origin routes` prints).
pub fn route_list() -> Vec<RouteInfo> {
    table(AdminGuard::new(
        Arc::from([]),
        1,
        client::TrustedProxies::default(),
    ))
    .finish()
    .1
}

/// The one place routes are added.
fn table(guard: AdminGuard) -> Routes {
    let table = Routes::new(guard);
    let table = clerk::routes(table, "/v1");
    let table = clerk::routes(table, "");
    tutorial::routes(table)
        .admin::<Clerk, _, _>(Method::GET, "/v1/audit_log", clerk::audit_log)
        .admin::<Clerk, _, _>(Method::GET, "/v1/status", status)
        .signed(Method::POST, "/v1/usage", ingest::usage)
        .github(Method::POST, "/v1/secret_scanning/github", github::alert)
        .open(Method::GET, "/healthz", healthz)
        .open(Method::GET, "/metrics", metrics)
}

/// Logs method, path, status and latency; never headers, query strings or bodies, which can
/// carry secrets. Every request at `debug` (an access log: `RUST_LOG=latchkey_origin::http=debug`);
/// slow ones and server errors at `warn`. A line per request at the default level cost a quarter
/// of verify throughput in the benchmarks (BENCHMARKS.md), for lines nobody reads.
async fn log_request(req: Request, next: Next) -> Response {
    let started = Instant::now();
    // Cheap clones (shared bytes), so the common case (nothing logged) allocates nothing.
    let method = req.method().clone();
    let uri = req.uri().clone();
    let response = next.run(req).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let failed_or_slow = status >= 500 || elapsed >= SLOW_REQUEST;
    if failed_or_slow || tracing::enabled!(tracing::Level::DEBUG) {
        let path = uri.path().chars().take(200).collect::<String>();
        let ms = elapsed.as_secs_f64() * 1000.0;
        if failed_or_slow {
            tracing::warn!(%method, %path, status, ms, "request (slow or failed)");
        } else {
            tracing::debug!(%method, %path, status, ms, "request");
        }
    }
    response
}

/// Requests slower than this are logged at `warn`.
const SLOW_REQUEST: std::time::Duration = std::time::Duration::from_millis(250);

/// Liveness of the database, and the KV publisher's backlog (`pending`, `lag_ms`) and state.
/// A backlog does not make origin unhealthy: it keeps serving while KV is away. Open, so it
/// shows counts and states only: an error's text (hosts, ports, the API's messages) is in the
/// log and in the admin status.
async fn healthz(State(state): State<AppState>) -> Response {
    health(&state, false).await
}

/// `GET /v1/status` (admin): `/healthz` with the KV publisher's last error in full.
async fn status(State(state): State<AppState>) -> Response {
    health(&state, true).await
}

async fn health(state: &AppState, detailed: bool) -> Response {
    match health_body(state, detailed).await {
        Ok(body) => Json(body).into_response(),
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

async fn health_body(
    state: &AppState,
    detailed: bool,
) -> Result<serde_json::Value, crate::store::StoreError> {
    let store = state.service.store();
    store.ping().await?;
    let (kv, ledger, webhooks) = if detailed {
        (
            state.publisher.detailed_report(store).await?,
            state.ledger.detailed_report(store).await?,
            state.webhooks.detailed_report(store).await?,
        )
    } else {
        (
            state.publisher.report(store).await?,
            state.ledger.report(store).await?,
            state.webhooks.report(store).await?,
        )
    };
    Ok(json!({ "status": "ok", "kv_publisher": kv, "ledger": ledger, "webhooks": webhooks }))
}

/// The publisher's figures in the Prometheus text format.
async fn metrics(State(state): State<AppState>) -> Response {
    let store = state.service.store();
    let reports = match state.publisher.report(store).await {
        Ok(report) => match state.ledger.report(store).await {
            Ok(ledger) => state
                .webhooks
                .report(store)
                .await
                .map(|webhooks| (report, ledger, webhooks)),
            Err(error) => Err(error),
        },
        Err(error) => Err(error),
    };
    let (report, ledger, webhooks) = match reports {
        Ok(reports) => reports,
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
    #[allow(
        clippy::cast_precision_loss,
        reason = "a lag in seconds needs no 53-bit precision"
    )]
    let ledger_lag_seconds = ledger.lag_ms as f64 / 1000.0;
    #[allow(
        clippy::cast_precision_loss,
        reason = "an age in seconds needs no 53-bit precision"
    )]
    let watermark_age_seconds = ledger
        .watermark_age_ms
        .map_or(-1.0, |ms| ms as f64 / 1000.0);
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
         latchkey_kv_publish_failures_total {}\n\
         # HELP latchkey_kv_verify_pending Keys to read back from KV after a write with an unknown outcome.\n\
         # TYPE latchkey_kv_verify_pending gauge\n\
         latchkey_kv_verify_pending {}\n\
         # HELP latchkey_kv_rewrites_total Keys found behind in KV and published again since start.\n\
         # TYPE latchkey_kv_rewrites_total counter\n\
         latchkey_kv_rewrites_total {}\n\
         # HELP latchkey_ledger_enabled Whether key changes are appended to the edge's change ledger.\n\
         # TYPE latchkey_ledger_enabled gauge\n\
         latchkey_ledger_enabled {}\n\
         # HELP latchkey_ledger_pending Key changes not yet appended to the change ledger.\n\
         # TYPE latchkey_ledger_pending gauge\n\
         latchkey_ledger_pending {}\n\
         # HELP latchkey_ledger_lag_seconds Age of the oldest key change not yet in the ledger.\n\
         # TYPE latchkey_ledger_lag_seconds gauge\n\
         latchkey_ledger_lag_seconds {ledger_lag_seconds:.3}\n\
         # HELP latchkey_ledger_watermark_age_seconds Age of the last watermark the ledger accepted (-1: none since start).\n\
         # TYPE latchkey_ledger_watermark_age_seconds gauge\n\
         latchkey_ledger_watermark_age_seconds {watermark_age_seconds:.3}\n\
         # HELP latchkey_ledger_appended_total Key changes the ledger appended since start.\n\
         # TYPE latchkey_ledger_appended_total counter\n\
         latchkey_ledger_appended_total {}\n\
         # HELP latchkey_ledger_failures_total Failed (and retried) ledger appends since start.\n\
         # TYPE latchkey_ledger_failures_total counter\n\
         latchkey_ledger_failures_total {}\n",
        report.pending,
        report.published,
        report.failures,
        report.verifications_pending,
        report.rewrites,
        u8::from(ledger.enabled),
        ledger.pending,
        ledger.appended,
        ledger.failures,
    );
    let mut body = body;
    {
        use std::fmt::Write as _;
        #[allow(
            clippy::cast_precision_loss,
            reason = "a lag in seconds needs no 53-bit precision"
        )]
        let webhook_lag_seconds = webhooks.lag_ms as f64 / 1000.0;
        let _ = write!(
            body,
            "# HELP latchkey_webhook_endpoints Endpoints key events are delivered to.\n\
             # TYPE latchkey_webhook_endpoints gauge\n\
             latchkey_webhook_endpoints {}\n\
             # HELP latchkey_webhook_pending Key events not yet delivered, summed over the endpoints.\n\
             # TYPE latchkey_webhook_pending gauge\n\
             latchkey_webhook_pending {}\n\
             # HELP latchkey_webhook_lag_seconds Age of the oldest key event some endpoint still waits for.\n\
             # TYPE latchkey_webhook_lag_seconds gauge\n\
             latchkey_webhook_lag_seconds {webhook_lag_seconds:.3}\n\
             # HELP latchkey_webhook_delivered_total Key events endpoints accepted since start.\n\
             # TYPE latchkey_webhook_delivered_total counter\n\
             latchkey_webhook_delivered_total {}\n\
             # HELP latchkey_webhook_failures_total Failed (and retried) deliveries since start.\n\
             # TYPE latchkey_webhook_failures_total counter\n\
             latchkey_webhook_failures_total {}\n",
            webhooks.endpoints, webhooks.pending, webhooks.delivered, webhooks.failures,
        );
    }
    if let Some(budget) = &report.api_budget {
        use std::fmt::Write as _;
        let _ = write!(
            body,
            "# HELP latchkey_kv_api_budget_limit Cloudflare API requests the publisher allows itself per five minutes (0: unlimited).\n\
             # TYPE latchkey_kv_api_budget_limit gauge\n\
             latchkey_kv_api_budget_limit {}\n\
             # HELP latchkey_kv_api_requests_window Cloudflare API requests sent in the last five minutes.\n\
             # TYPE latchkey_kv_api_requests_window gauge\n\
             latchkey_kv_api_requests_window {}\n\
             # HELP latchkey_kv_api_requests_total Cloudflare API requests sent since start.\n\
             # TYPE latchkey_kv_api_requests_total counter\n\
             latchkey_kv_api_requests_total {}\n\
             # HELP latchkey_kv_api_throttled Whether a 429 pauses every KV request now (1) or not (0).\n\
             # TYPE latchkey_kv_api_throttled gauge\n\
             latchkey_kv_api_throttled {}\n\
             # HELP latchkey_kv_api_retry_after_seconds Seconds left of the pause a 429's Retry-After asked for.\n\
             # TYPE latchkey_kv_api_retry_after_seconds gauge\n\
             latchkey_kv_api_retry_after_seconds {}\n\
             # HELP latchkey_kv_api_rate_limited_total 429 answers from the KV API since start.\n\
             # TYPE latchkey_kv_api_rate_limited_total counter\n\
             latchkey_kv_api_rate_limited_total {}\n\
             # HELP latchkey_kv_api_budget_waits_total Requests that waited for the budget since start.\n\
             # TYPE latchkey_kv_api_budget_waits_total counter\n\
             latchkey_kv_api_budget_waits_total {}\n",
            budget.limit.unwrap_or(0),
            budget.used,
            budget.requests_total,
            u8::from(budget.throttled),
            budget.retry_after_s,
            budget.rate_limited_total,
            budget.waits_total,
        );
    }
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
