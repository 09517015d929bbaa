//! `POST /v1/usage`: the edge reports which keys verified there, so `last_used_at` stays true.
//!
//! Not an admin route: the edge holds no admin token. Instead each batch is signed with
//! HMAC-SHA256 over a timestamp and the exact body (`USAGE_SIGNING_SECRET`, shared with the
//! edge). A batch older or newer than five minutes, a bad signature and a replay of a batch
//! already accepted are refused.
//!
//! The replay guard keys on what was signed: the decoded 32-byte MAC, a function of the
//! timestamp's value and the body, so neither another spelling of the signature (upper-case
//! hex) nor of the timestamp (a leading zero) makes a replay look new. Accepted MACs are kept
//! in the database until their timestamp leaves the skew window, so a restart does not open a
//! window for replays either.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use latchkey_shared::sign::{self, MAX_CLOCK_SKEW_MS, SignatureError, SigningSecret, header};
use latchkey_shared::{KeyId, UnixMillis};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::{ApiError, Clerk};
use super::extract::RawBody;
use super::throttle::LogThrottle;
use crate::service::{KeyService, system_now};
use crate::store::StoreError;

/// Most uses in one batch (the edge sends at most its pending map, 10,000 keys).
const USES_MAX: usize = 10_000;

/// Verifies and de-duplicates usage batches.
#[derive(Debug)]
pub struct UsageIngest {
    secret: SigningSecret,
}

impl UsageIngest {
    /// An ingest accepting batches signed with `secret`.
    pub fn new(secret: SigningSecret) -> Self {
        Self { secret }
    }

    /// Checks a batch's signature and freshness, and that it was not accepted before.
    async fn admit(
        &self,
        service: &KeyService,
        headers: &HeaderMap,
        body: &[u8],
        now: UnixMillis,
    ) -> Result<(), Refusal> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let verified = sign::verify_signed(
            self.secret.as_bytes(),
            text(header::TIMESTAMP),
            text(header::SIGNATURE),
            now,
            |t| sign::usage_message(t, body),
        )
        .map_err(Refusal::Signature)?;
        // Keyed on the decoded MAC (what was signed), not its text; past `until` the timestamp
        // check refuses the batch anyway.
        let until = UnixMillis(verified.timestamp.0.saturating_add(MAX_CLOCK_SKEW_MS));
        match service.admit_usage_batch(&verified.mac, until, now).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Refusal::Replayed),
            Err(error) => Err(Refusal::Store(error)),
        }
    }
}

enum Refusal {
    Signature(SignatureError),
    Replayed,
    Store(StoreError),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    #[allow(
        dead_code,
        reason = "names the batch in the signed body so replays are distinct"
    )]
    batch: String,
    uses: Vec<Use>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Use {
    id: String,
    at: i64,
}

/// Accepts a signed usage batch.
pub async fn usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body, _): RawBody<Clerk>,
) -> Result<Json<Value>, ApiError<Clerk>> {
    let Some(ingest) = &state.usage_ingest else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "usage_ingest_disabled",
            "Usage reporting is off: set USAGE_SIGNING_SECRET on origin and the edge.",
        ));
    };
    let now = system_now();
    match ingest.admit(&state.service, &headers, &body, now).await {
        Ok(()) => {}
        Err(Refusal::Store(error)) => return Err(error.into()),
        Err(Refusal::Signature(e)) => {
            static REFUSALS: LogThrottle = LogThrottle::new();
            if let Some(left_out) = REFUSALS.allow(std::time::Instant::now()) {
                tracing::warn!(
                    error = %e,
                    refused_since_last_line = left_out,
                    "usage batch refused (one such line every 10 s at most)"
                );
            }
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "signature_invalid",
                format!("The usage batch is not signed correctly: {e}."),
            ));
        }
        Err(Refusal::Replayed) => {
            static REPLAYS: LogThrottle = LogThrottle::new();
            if let Some(left_out) = REPLAYS.allow(std::time::Instant::now()) {
                tracing::warn!(
                    refused_since_last_line = left_out,
                    "usage batch replayed; refused (one such line every 10 s at most)"
                );
            }
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "replayed",
                "This usage batch was already accepted.",
            ));
        }
    }
    let batch: Batch = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            format!("The usage batch does not parse: {e}."),
        )
    })?;
    if batch.uses.len() > USES_MAX {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            format!("At most {USES_MAX} uses per batch."),
        ));
    }
    let mut accepted = 0usize;
    for entry in &batch.uses {
        // A use in the future is clamped: a skewed edge clock cannot push last_used_at ahead.
        if let Ok(id) = KeyId::parse(&entry.id) {
            state
                .service
                .record_use(&id, UnixMillis(entry.at.min(now.0)));
            accepted += 1;
        }
    }
    Ok(Json(json!({ "accepted": accepted })))
}
