//! `POST /v1/secret_scanning/github`: GitHub's secret scanning partner alerts.
//!
//! GitHub sends batches of tokens it found in public code, signed with its ECDSA key
//! ([`crate::secret_scanning`]). Each token that is one of our keys is reported as leaked
//! ([`KeyService::report_leak`]: revoked at once, or flagged, per `LEAK_ACTION`), and the batch
//! is answered in GitHub's feedback format: one `{token_hash, token_type, label}` per token,
//! `true_positive` for our keys and `false_positive` for the rest. Reports are idempotent, so
//! GitHub's retries change nothing; a store failure answers 503, which GitHub retries.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequest as _, Request, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AppState;
use super::error::{ApiError, Clerk};
use super::extract::RawBody;
use crate::secret_scanning::{SignatureError, header};
use crate::service::{KeyService, Leak, limits};

/// Most tokens in one alert.
pub const TOKENS_MAX: usize = 10_000;
/// Largest alert body, in bytes (thousands of tokens with their URLs).
pub const BODY_MAX_BYTES: usize = 8 * 1024 * 1024;
/// Who the audit log names for these reports.
const ACTOR: &str = "github_secret_scanning";

/// One match, as GitHub sends it. Fields GitHub may add later are ignored.
#[derive(Debug, Deserialize)]
struct Found {
    token: String,
    #[serde(default, rename = "type")]
    token_type: String,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    source: Option<String>,
}

/// GitHub's feedback for one token.
#[derive(Debug, Serialize)]
pub(super) struct Feedback {
    /// SHA-256 of the token, in hex: the token itself is never echoed.
    token_hash: String,
    token_type: String,
    label: &'static str,
}

/// Alert bodies read at once: each may be [`BODY_MAX_BYTES`], and the signature can only be
/// checked once the body is in, so the memory they take is bounded here. Others wait.
const READING_MAX: usize = 4;

static READING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(READING_MAX);

/// The longest an alert waits for a reading slot; then 503, which GitHub retries (slow senders
/// holding every slot cannot hold real alerts for ever).
const READING_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Verifies the alert, reports every token that is one of our keys, and answers feedback.
/// The headers are checked before the body is read.
pub(super) async fn alert(
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<Vec<Feedback>>, ApiError<Clerk>> {
    let Some(keys) = &state.github else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "secret_scanning_disabled",
            "GitHub secret scanning is off: set GITHUB_SECRET_SCANNING_KEYS_FILE or GITHUB_SECRET_SCANNING_KEYS_URL.",
        ));
    };
    let headers = request.headers();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let checked = keys
        .check_headers(text(header::KEY_IDENTIFIER), text(header::SIGNATURE))
        .await
        .map_err(refused)?;
    let busy = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "Other alerts are being read; retry.",
        )
    };
    let _reading = tokio::time::timeout(READING_WAIT, READING.acquire())
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())?;
    let RawBody(body, _) = RawBody::<Clerk>::from_request(request, &state).await?;
    checked.verify(&body).map_err(refused)?;
    let found: Vec<Found> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            format!("The alert is not a JSON array of {{token, type, url, source}}: {e}."),
        )
    })?;
    if found.len() > TOKENS_MAX {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            format!("At most {TOKENS_MAX} tokens per alert."),
        ));
    }
    let ours = report(&state, &found).await?;
    Ok(Json(
        found
            .into_iter()
            .map(|f| {
                let token_hash = hex::encode(Sha256::digest(f.token.as_bytes()));
                let label = if ours.contains(&token_hash) {
                    "true_positive"
                } else {
                    "false_positive"
                };
                Feedback {
                    token_hash,
                    token_type: f.token_type,
                    label,
                }
            })
            .collect(),
    ))
}

/// The answer to an alert whose signature was not accepted.
fn refused(error: SignatureError) -> ApiError<Clerk> {
    tracing::warn!(%error, "GitHub secret scanning alert refused");
    let (status, code) = match error {
        SignatureError::NoKeys | SignatureError::NotReloaded => {
            (StatusCode::SERVICE_UNAVAILABLE, "keys_unavailable")
        }
        _ => (StatusCode::UNAUTHORIZED, "signature_invalid"),
    };
    ApiError::new(
        status,
        code,
        format!("The alert's signature was not accepted: {error}."),
    )
}

/// Looks each token up and reports the keys found, concurrently (their commits are grouped).
/// Returns our keys' token hashes.
async fn report(state: &AppState, found: &[Found]) -> Result<HashSet<String>, ApiError<Clerk>> {
    let mut ours = HashSet::new();
    let mut reports = tokio::task::JoinSet::new();
    let mut failed = None;
    for f in found {
        let hash = hex::encode(Sha256::digest(f.token.as_bytes()));
        if ours.contains(&hash) {
            continue;
        }
        let key = match state.service.key_for_secret(&f.token).await {
            Ok(Some(key)) => key,
            Ok(None) => continue,
            Err(error) => {
                // Stop looking, but let the reports already under way finish.
                failed = Some(ApiError::from(error));
                break;
            }
        };
        ours.insert(hash);
        let leak = Leak {
            reported_by: ACTOR,
            source: Some(source(f)),
            action: state.leak_action,
        };
        let service: Arc<KeyService> = state.service.clone();
        reports.spawn(async move { service.report_leak(ACTOR, &key.id, &leak).await });
    }
    while let Some(done) = reports.join_next().await {
        match done {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => failed = Some(ApiError::from(error)),
            Err(join) => {
                tracing::error!(error = %join, "a leak report task failed");
                failed = Some(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "Something went wrong on our side.",
                ));
            }
        }
    }
    // GitHub retries a failed alert; the reports already made are not made twice.
    failed.map_or(Ok(ours), Err)
}

/// Where the token was found: the URL if GitHub gave one, bounded and printable.
fn source(found: &Found) -> String {
    let text = match (&found.url, &found.source) {
        (Some(url), _) => url.clone(),
        (None, Some(source)) => format!("GitHub secret scanning ({source})"),
        (None, None) => "GitHub secret scanning".to_owned(),
    };
    text.chars()
        .filter(|c| !c.is_control())
        .take(limits::LEAK_SOURCE_MAX)
        .collect()
}
