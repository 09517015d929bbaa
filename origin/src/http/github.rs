//! `POST /v1/secret_scanning/github`: GitHub's secret scanning partner alerts.
//!
//! GitHub sends batches of tokens it found in public code, signed with its ECDSA key
//! ([`crate::leaks::github_keys`]). Each token that is one of our keys is reported as leaked
//! ([`KeyService::report_leak`]: revoked at once, or flagged, per `LEAK_ACTION`), and the batch
//! is answered in GitHub's feedback format: one `{token_hash, token_type, label}` per token,
//! `true_positive` for our keys and `false_positive` for the rest. Reports are idempotent, so
//! GitHub's retries change nothing; a store failure answers 503, which GitHub retries.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes, HttpBody as _};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{self, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

use super::AppState;
use super::client::client_key;
use super::error::{ApiError, Clerk};
use super::extract::BodyDeadline;
use super::throttle::LogThrottle;
use crate::leaks::github_keys::{SignatureError, header};
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

/// Alert bodies one client address may have in reading at once; its next one waits behind
/// them (for at most [`READING_WAIT`]). The address is the TCP peer's, or behind a proxy listed
/// in `TRUSTED_PROXIES` the one it forwarded. Anyone can send the headers of an alert (GitHub's
/// key identifiers are public and a signature only has to parse), and the signature can only
/// be checked once the body is in: so slow senders wait behind each other, never in front of
/// a caller from another address such as GitHub.
const READING_PER_CLIENT: u32 = 2;

/// Bytes of alert bodies held in memory at once, over every client: each body takes its
/// share chunk by chunk as it arrives, so a slow sender holds only what it has sent.
const READING_BYTES: usize = 8 * BODY_MAX_BYTES;

/// Bytes one client address may hold in reading at once, over its slots: a fast sender fills
/// at most this much of [`READING_BYTES`], so filling it all takes eight addresses sending
/// at full speed.
const READING_BYTES_PER_CLIENT: usize = BODY_MAX_BYTES;

static READING_BUDGET: Semaphore = Semaphore::const_new(READING_BYTES);

/// Reading slots per client address.
static READING: LazyLock<ClientSlots> = LazyLock::new(ClientSlots::default);

/// The longest an alert waits for its client's reading slot; then 503, which GitHub retries.
const READING_WAIT: Duration = Duration::from_secs(10);

/// The longest a body waits for memory (its client's share, or the total) before its next
/// chunk is taken in; then 503, which GitHub retries.
const MEMORY_WAIT: Duration = Duration::from_secs(5);

/// One client address's reading slots and its share of the bytes.
#[derive(Debug)]
struct Client {
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

/// Per-address reading slots: the slots and byte share of each client address with a body in
/// reading, dropped when its last holder and waiter are gone (the table holds only the
/// addresses in use).
#[derive(Debug, Default)]
struct ClientSlots {
    by_client: Mutex<HashMap<IpAddr, Arc<Client>>>,
}

/// A client's reading slot; gives it back on drop.
struct ClientSlot {
    address: IpAddr,
    client: Arc<Client>,
    permit: Option<OwnedSemaphorePermit>,
}

impl ClientSlots {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Arc<Client>>> {
        self.by_client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for one of `address`'s slots.
    async fn acquire(&'static self, address: IpAddr) -> Option<ClientSlot> {
        let client = self
            .table()
            .entry(address)
            .or_insert_with(|| {
                Arc::new(Client {
                    slots: Arc::new(Semaphore::new(READING_PER_CLIENT as usize)),
                    bytes: Arc::new(Semaphore::new(READING_BYTES_PER_CLIENT)),
                })
            })
            .clone();
        let mut slot = ClientSlot {
            address,
            client: client.clone(),
            permit: None,
        };
        // On a time-out `slot` is dropped, which forgets the entry if nobody else holds it.
        slot.permit = Some(client.slots.clone().acquire_owned().await.ok()?);
        Some(slot)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut table = READING.table();
        // The table's own reference and this one: nobody else holds or waits for a slot.
        if Arc::strong_count(&self.client) == 2 {
            table.remove(&self.address);
        }
    }
}

/// What a body in reading holds of memory: its client's share and the total's.
struct Held {
    _client: Option<OwnedSemaphorePermit>,
    _total: Option<SemaphorePermit<'static>>,
}

/// Reads `body` within `deadline`, at most [`BODY_MAX_BYTES`], taking its share of its client's
/// bytes and of [`READING_BUDGET`] as each chunk arrives (waiting at most [`MEMORY_WAIT`] for
/// either). Returns the body and what it holds.
async fn read_body(
    body: Body,
    slot: &ClientSlot,
    declared: Option<usize>,
    deadline: Duration,
) -> Result<(Bytes, Held), ApiError<Clerk>> {
    let read = async {
        let mut body = std::pin::pin!(body);
        // Sized once from the declared length (at most the cap): no doubling past it.
        let mut data = Vec::with_capacity(declared.unwrap_or(0).min(BODY_MAX_BYTES));
        let mut held = Held {
            _client: None,
            _total: None,
        };
        while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            let frame = frame.map_err(|_| malformed())?;
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            if data.len().saturating_add(chunk.len()) > BODY_MAX_BYTES {
                return Err(too_large());
            }
            // Within BODY_MAX_BYTES, so within u32.
            let n = u32::try_from(chunk.len()).map_err(|_| too_large())?;
            let mine =
                tokio::time::timeout(MEMORY_WAIT, slot.client.bytes.clone().acquire_many_owned(n))
                    .await
                    .map_err(|_| busy())?
                    .map_err(|_| busy())?;
            let total = tokio::time::timeout(MEMORY_WAIT, READING_BUDGET.acquire_many(n))
                .await
                .map_err(|_| busy())?
                .map_err(|_| busy())?;
            match &mut held._client {
                Some(h) => h.merge(mine),
                None => held._client = Some(mine),
            }
            match &mut held._total {
                Some(h) => h.merge(total),
                None => held._total = Some(total),
            }
            data.extend_from_slice(&chunk);
        }
        Ok((Bytes::from(data), held))
    };
    tokio::time::timeout(deadline, read).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "The request body did not arrive within {} ms.",
                deadline.as_millis()
            ),
        )
    })?
}

fn busy() -> ApiError<Clerk> {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        "Other alerts are being read; retry.",
    )
}

fn malformed() -> ApiError<Clerk> {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "malformed_request",
        "The request body could not be read.",
    )
}

fn too_large() -> ApiError<Clerk> {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("The request body is larger than {BODY_MAX_BYTES} bytes."),
    )
}

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
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    let client = client_key(
        state
            .trusted_proxies
            .client_address(peer, request.headers()),
    );
    let deadline = request
        .extensions()
        .get::<BodyDeadline>()
        .map_or(READING_WAIT, |d| d.0);
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_MAX_BYTES as u64) {
        return Err(too_large());
    }
    let declared = declared.and_then(|n| usize::try_from(n).ok());
    let slot = tokio::time::timeout(READING_WAIT, READING.acquire(client))
        .await
        .ok()
        .flatten()
        .ok_or_else(busy)?;
    let (body, memory) = read_body(request.into_body(), &slot, declared, deadline).await?;
    // Read: the slot goes back before the reports (which may take long); the memory once the
    // body is parsed and dropped.
    drop(slot);
    checked.verify(&body).map_err(refused)?;
    let found: Vec<Found> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_invalid",
            format!("The alert is not a JSON array of {{token, type, url, source}}: {e}."),
        )
    })?;
    drop((body, memory));
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
    static REFUSALS: LogThrottle = LogThrottle::new();
    if let Some(left_out) = REFUSALS.allow(std::time::Instant::now()) {
        tracing::warn!(
            %error,
            refused_since_last_line = left_out,
            "GitHub secret scanning alert refused (one such line every 10 s at most)"
        );
    }
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
            by_secret: true,
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
