//! `GET /healthz`, `GET /metrics` (open) and `GET /v1/status` (admin): the publishers'
//! backlogs and states.
//!
//! The open routes show counts and states only (an error's text names hosts, ports and the
//! API's messages: it is in the log and the admin status). Anyone can call them, so what they
//! read from the database is computed at most once per [`REFRESH_EVERY`] whatever the request
//! rate, by one request while the others wait for its answer ([`OpenFigures`]): a flood of
//! them costs the database one round of queries a second, never the publishers' turn.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use super::AppState;
use crate::delivery::kv::publisher::PublisherReport;
use crate::delivery::ledger::LedgerReport;
use crate::delivery::webhooks::WebhookReport;
use crate::jobs::policy::{StaleGate, stale_gate};
use crate::service::system_now;
use crate::store::StoreError;

/// How long the open routes' figures are served from memory.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// What the open routes show: the three sinks' reports, read together.
#[derive(Debug)]
struct Figures {
    kv: PublisherReport,
    ledger: LedgerReport,
    webhooks: WebhookReport,
    key_policy: PolicyReport,
}

/// What `/healthz` shows of the stale-key policy.
#[derive(Debug, Serialize)]
struct PolicyReport {
    /// `off`, `active`, or `held` while no usage report from the edge is recent enough to
    /// trust idle times (see [`crate::jobs::policy`]).
    stale_keys: &'static str,
    /// Milliseconds since origin last accepted a usage batch (`null`: never).
    usage_report_age_ms: Option<i64>,
}

async fn policy_report(state: &AppState) -> Result<PolicyReport, StoreError> {
    let last = state.service.store().last_usage_report().await?;
    let now = system_now();
    let usage_report_age_ms = last.map(|at| now.0.saturating_sub(at.0).max(0));
    let stale_keys = match state.stale_policy_usage_max_age {
        None => "off",
        Some(max_age) => match stale_gate(now, last, max_age) {
            StaleGate::Open => "active",
            StaleGate::Held { .. } => "held",
        },
    };
    Ok(PolicyReport {
        stale_keys,
        usage_report_age_ms,
    })
}

/// The figures, or `Err` where the database could not be read (logged once per refresh).
type Read = Arc<Result<Figures, ()>>;

/// The open routes' figures, computed at most once per [`REFRESH_EVERY`] (single flight: the
/// requests that arrive while they are computed wait for that computation).
#[derive(Debug, Default)]
pub struct OpenFigures {
    latest: tokio::sync::Mutex<Option<(Instant, Read)>>,
    refreshes: AtomicU64,
}

impl OpenFigures {
    /// The figures, at most [`REFRESH_EVERY`] old; `Err` when the database could not be read
    /// (logged once per refresh). The refresh runs in a task of its own, holding the lock: a
    /// request that goes away meanwhile (its client gone) neither cancels it nor lets another
    /// refresh start beside it.
    async fn get(&self, state: &AppState) -> Read {
        let state = state.clone();
        tokio::spawn(async move { state.open_figures.refresh_if_old(&state).await })
            .await
            .unwrap_or_else(|_| Arc::new(Err(())))
    }

    async fn refresh_if_old(&self, state: &AppState) -> Read {
        let mut latest = self.latest.lock().await;
        if let Some((at, figures)) = latest.as_ref()
            && at.elapsed() < REFRESH_EVERY
        {
            return figures.clone();
        }
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        let figures = Arc::new(read(state, false).await.map_err(|error| {
            tracing::error!(%error, "health check: cannot read the database");
        }));
        *latest = Some((Instant::now(), figures.clone()));
        figures
    }

    /// How many times the figures were read from the database since start.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }
}

/// Reads the three reports (with each one's last error in full if `detailed`).
async fn read(state: &AppState, detailed: bool) -> Result<Figures, StoreError> {
    let store = state.service.store();
    store.ping().await?;
    Ok(if detailed {
        Figures {
            kv: state.publisher.detailed_report(store).await?,
            ledger: state.ledger.detailed_report(store).await?,
            webhooks: state.webhooks.detailed_report(store).await?,
            key_policy: policy_report(state).await?,
        }
    } else {
        Figures {
            kv: state.publisher.report(store).await?,
            ledger: state.ledger.report(store).await?,
            webhooks: state.webhooks.report(store).await?,
            key_policy: policy_report(state).await?,
        }
    })
}

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "status": "unavailable" })),
    )
        .into_response()
}

fn body(figures: &Figures) -> serde_json::Value {
    json!({
        "status": "ok",
        "kv_publisher": figures.kv,
        "ledger": figures.ledger,
        "webhooks": figures.webhooks,
        "key_policy": figures.key_policy,
        "roles": crate::store::lease::held_roles(),
    })
}

/// Liveness of the database, and the KV publisher's, the ledger's and the webhooks' backlogs
/// and states. A backlog does not make origin unhealthy: it keeps serving while KV is away.
pub(super) async fn healthz(State(state): State<AppState>) -> Response {
    match state.open_figures.get(&state).await.as_ref() {
        Ok(figures) => Json(body(figures)).into_response(),
        Err(()) => unavailable(),
    }
}

/// `GET /v1/status` (admin): `/healthz` with the publishers' last errors in full, read afresh.
pub(super) async fn status(State(state): State<AppState>) -> Response {
    match read(&state, true).await {
        Ok(figures) => Json(body(&figures)).into_response(),
        Err(error) => {
            tracing::error!(%error, "status: cannot read the database");
            unavailable()
        }
    }
}

/// The figures in the Prometheus text format.
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let figures = state.open_figures.get(&state).await;
    let Ok(Figures {
        kv: report,
        ledger,
        webhooks,
        key_policy,
    }) = figures.as_ref()
    else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
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
    {
        use std::fmt::Write as _;
        let _ = write!(
            body,
            "# HELP latchkey_stale_key_policy_held Whether the stale-key policy is held for want of recent usage reports (1) or not (0; also when it is off).\n\
             # TYPE latchkey_stale_key_policy_held gauge\n\
             latchkey_stale_key_policy_held {}\n\
             # HELP latchkey_usage_report_age_seconds Time since origin last accepted a usage batch from the edge (-1: never).\n\
             # TYPE latchkey_usage_report_age_seconds gauge\n\
             latchkey_usage_report_age_seconds {:.3}\n\
             # HELP latchkey_open_figures_refreshes_total Times /healthz and /metrics read their figures from the database (at most once a second).\n\
             # TYPE latchkey_open_figures_refreshes_total counter\n\
             latchkey_open_figures_refreshes_total {}\n",
            u8::from(key_policy.stale_keys == "held"),
            key_policy
                .usage_report_age_ms
                .map_or(-1.0, |ms| ms as f64 / 1000.0),
            state.open_figures.refreshes(),
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
