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

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::{Extension, Router};

use crate::config::AdminToken;
use crate::delivery::kv::publisher::PublisherStatus;
use crate::delivery::ledger::LedgerStatus;
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
pub mod health;
pub mod ingest;
pub mod routes;
pub mod throttle;
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
    pub github: Option<Arc<crate::leaks::github_keys::GithubKeys>>,
    /// What a leak report does to the key (`LEAK_ACTION`).
    pub leak_action: crate::service::LeakAction,
    /// The event webhooks' counters, for `/healthz` and `/metrics`.
    pub webhooks: Arc<crate::delivery::webhooks::WebhookStatus>,
    /// What `/healthz` and `/metrics` show, read from the database at most once a second.
    pub open_figures: health::OpenFigures,
    /// `STALE_KEY_USAGE_MAX_AGE` where the stale-key policy is on (`None`: off), for the
    /// policy's state in `/healthz`.
    pub stale_policy_usage_max_age: Option<std::time::Duration>,
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

/// Parses `bytes` as every JSON request body of the API, as a number of seconds (converted to
/// milliseconds) and, if it is UTF-8, as a query string and a numeric query value, exactly as
/// the handlers would; returns how many parsers accepted it. For the `origin_body` fuzz
/// target: whatever the bytes, this must not panic.
#[doc(hidden)]
pub fn parse_request_bodies(bytes: &[u8]) -> usize {
    let query = std::str::from_utf8(bytes).ok().map_or(0, |q| {
        usize::from(extract::query_pairs::<Clerk>(Some(q)).is_ok())
            + usize::from(extract::parse_whole_number::<Clerk>("limit", q, 0..=u32::MAX).is_ok())
    });
    let seconds = serde_json::from_slice::<extract::Seconds>(bytes).map_or(0, |s| {
        // Saturating, and rounded up: a positive number of seconds is a positive lifetime.
        assert!(
            s.0 <= 0.0 || s.millis() > 0,
            "{} s became {} ms",
            s.0,
            s.millis()
        );
        1
    });
    clerk::parse_bodies(bytes) + tutorial::parse_bodies(bytes) + query + seconds
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
        .admin::<Clerk, _, _>(Method::GET, "/v1/status", health::status)
        .signed(Method::POST, "/v1/usage", ingest::usage)
        .github(Method::POST, "/v1/secret_scanning/github", github::alert)
        .open(Method::GET, "/healthz", health::healthz)
        .open(Method::GET, "/metrics", health::metrics)
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
            // Anyone can make requests slow or failing (a trickled body, a flood): one line per
            // kind every 10 s, with the count left out; every request is at `debug`.
            static FAILED: throttle::LogThrottle = throttle::LogThrottle::new();
            static SLOW: throttle::LogThrottle = throttle::LogThrottle::new();
            let throttle = if status >= 500 { &FAILED } else { &SLOW };
            if let Some(left_out) = throttle.allow(started + elapsed) {
                tracing::warn!(
                    %method,
                    %path,
                    status,
                    ms,
                    like_it_since_last_line = left_out,
                    "request (slow or failed; one such line every 10 s at most)"
                );
            } else {
                tracing::debug!(%method, %path, status, ms, "request (slow or failed)");
            }
        } else {
            tracing::debug!(%method, %path, status, ms, "request");
        }
    }
    response
}

/// Requests slower than this are logged at `warn`.
const SLOW_REQUEST: std::time::Duration = std::time::Duration::from_millis(250);

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
