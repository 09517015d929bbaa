//! The primary REST API, compatible with Clerk's Backend API for API keys, so that
//! `@clerk/backend`'s `apiKeys` client works against origin unchanged. Times are unix ms.

use axum::extract::{RawQuery, State};
use axum::http::{Method, StatusCode};
use axum::{Extension, Json};
use latchkey_shared::{KeyId, UnixMillis, Verdict};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{ApiError, Clerk};
use super::extract::{self, Expiry, JsonBody, KeyIdPath, Seconds, cleared_when_empty};
use super::routes::Routes;
use super::{Actor, AppState};
use crate::model::{AuditEntry, ListFilter, StoredKey};
use crate::service::{KeyChanges, Leak, NewKey, Roll, limits, system_now};

type Result<T> = std::result::Result<Json<T>, ApiError<Clerk>>;
type Body<T> = JsonBody<T, Clerk>;

/// Adds the `/api_keys` routes under `base` (`/v1`, and `""` for Clerk's SDK).
pub fn routes(table: Routes, base: &str) -> Routes {
    let keys = format!("{base}/api_keys");
    table
        .admin::<Clerk, _, _>(Method::POST, &keys, create)
        .admin::<Clerk, _, _>(Method::GET, &keys, list)
        .admin::<Clerk, _, _>(Method::POST, &format!("{keys}/verify"), verify)
        .admin::<Clerk, _, _>(Method::GET, &format!("{keys}/{{id}}"), show)
        .admin::<Clerk, _, _>(Method::PATCH, &format!("{keys}/{{id}}"), update)
        .admin::<Clerk, _, _>(Method::DELETE, &format!("{keys}/{{id}}"), delete)
        .admin::<Clerk, _, _>(Method::POST, &format!("{keys}/{{id}}/revoke"), revoke)
        .admin::<Clerk, _, _>(Method::POST, &format!("{keys}/{{id}}/roll"), roll)
        .admin::<Clerk, _, _>(Method::POST, &format!("{keys}/{{id}}/leak"), report_leak)
        .admin::<Clerk, _, _>(Method::GET, &format!("{keys}/{{id}}/secret"), refuse_secret)
}

/// Clerk's deleted object.
#[derive(Debug, Serialize)]
struct Deleted {
    id: String,
    object: &'static str,
    deleted: bool,
}

/// `DELETE /api_keys/{id}`: the key is revoked (if it was not) and hidden from then on, as
/// Clerk's SDK expects; its row, the secret's hash and its audit entries stay
/// ([`crate::service::KeyService::delete`]).
async fn delete(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    KeyIdPath(id, _): KeyIdPath<Clerk>,
) -> Result<Deleted> {
    let key = state.service.delete(&actor, &id).await?;
    Ok(Json(Deleted {
        id: key.id.to_string(),
        object: "api_key",
        deleted: true,
    }))
}

/// Clerk's SDK has `apiKeys.getSecret`; Latchkey stores only a hash, so no secret can be shown.
async fn refuse_secret(KeyIdPath(_, _): KeyIdPath<Clerk>) -> ApiError<Clerk> {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "secret_not_stored",
        "Secrets are shown once, when the key is created, and never stored; create a new key instead.",
    )
}

/// Clerk's API key object.
#[derive(Debug, Serialize)]
pub struct ApiKeyObject {
    object: &'static str,
    id: String,
    r#type: String,
    name: String,
    subject: String,
    description: Option<String>,
    scopes: Vec<String>,
    claims: Option<Map<String, Value>>,
    revoked: bool,
    revocation_reason: Option<String>,
    /// Latchkey's own: switched off until enabled again (Clerk's object has no such field).
    disabled: bool,
    /// Latchkey's own: the only addresses the key may be used from (empty: anywhere).
    allowed_ips: Vec<String>,
    /// Latchkey's own: the key this one replaced in a roll.
    rolled_from: Option<String>,
    /// Latchkey's own: the key that replaced this one in a roll.
    rolled_to: Option<String>,
    /// Latchkey's own: when the key was first reported as leaked.
    leaked_at: Option<i64>,
    /// Latchkey's own: where it was found, as the first report said.
    leak_source: Option<String>,
    expired: bool,
    expiration: Option<i64>,
    created_by: Option<String>,
    last_used_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

impl ApiKeyObject {
    fn new(key: StoredKey, now: UnixMillis) -> Self {
        Self {
            object: "api_key",
            expired: key.is_expired(now),
            r#type: key.key_type,
            id: key.id.to_string(),
            name: key.name,
            subject: key.subject,
            description: key.description,
            scopes: key.scopes.to_strings(),
            claims: key.claims,
            revoked: key.revoked,
            revocation_reason: key.revocation_reason,
            disabled: key.disabled,
            allowed_ips: key.allowed_ips.to_strings(),
            rolled_from: key.rolled_from.map(|id| id.to_string()),
            rolled_to: key.rolled_to.map(|id| id.to_string()),
            leaked_at: key.leaked_at.map(|t| t.0),
            leak_source: key.leak_source,
            expiration: key.expiration.map(|t| t.0),
            created_by: key.created_by,
            last_used_at: key.last_used_at.map(|t| t.0),
            created_at: key.created_at.0,
            updated_at: key.updated_at.0,
            secret: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    name: String,
    subject: String,
    /// Clerk's key type, 3 to 25 characters; `api_key` when absent.
    #[serde(default)]
    r#type: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default, deserialize_with = "latchkey_shared::verify::null_as_default")]
    scopes: Vec<String>,
    #[serde(default)]
    claims: Option<Value>,
    /// Any JSON number of seconds, whole or not (Clerk's SDKs send `3600.0`).
    #[serde(default)]
    seconds_until_expiration: Option<Seconds>,
    #[serde(default)]
    created_by: Option<String>,
    #[serde(default, deserialize_with = "latchkey_shared::verify::null_as_default")]
    allowed_ips: Vec<String>,
}

async fn create(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    JsonBody(req, _): Body<CreateRequest>,
) -> std::result::Result<(StatusCode, Json<ApiKeyObject>), ApiError<Clerk>> {
    let new = NewKey {
        name: req.name,
        subject: req.subject,
        description: req.description,
        scopes: req.scopes,
        claims: req.claims,
        lifetime_ms: req.seconds_until_expiration.map(Seconds::millis),
        key_type: req.r#type,
        created_by: req.created_by,
        allowed_ips: req.allowed_ips,
    };
    let (key, secret) = state.service.create(&actor, new).await?;
    let mut object = ApiKeyObject::new(key, system_now());
    object.secret = Some(secret.expose().to_owned());
    Ok((StatusCode::CREATED, Json(object)))
}

#[derive(Debug, Serialize)]
struct KeyList {
    data: Vec<ApiKeyObject>,
    total_count: u64,
}

async fn list(State(state): State<AppState>, RawQuery(query): RawQuery) -> Result<KeyList> {
    let now = system_now();
    let mut filter = ListFilter {
        now,
        limit: 10,
        ..ListFilter::default()
    };
    let mut include_invalid = false;
    for (name, value) in extract::query_pairs(query.as_deref())? {
        if extract::apply_filter_param(&mut filter, &name, &value)? {
            continue;
        }
        match name.as_str() {
            // Clerk's document types these as numbers, and its Python SDK sends `20.0`.
            "limit" => {
                filter.limit = extract::parse_whole_number(
                    &name,
                    &value,
                    1..=crate::service::limits::LIST_LIMIT_MAX,
                )?
            }
            "offset" => filter.offset = extract::parse_whole_number(&name, &value, 0..=u32::MAX)?,
            "include_invalid" => include_invalid = extract::parse_bool(&name, &value)?,
            "type" => {
                // Trimmed, as create stores it. A type longer than any key's can have matches
                // none, as at Clerk.
                let value = value.trim().to_owned();
                if value.chars().count() < *limits::KEY_TYPE_LEN.start()
                    || value.chars().any(char::is_control)
                {
                    return Err(extract::bad_param(
                        &name,
                        "at least 3 characters, none of them a control character",
                    ));
                }
                filter.key_type = Some(value)
            }
            "query" => {
                // No name holds a control character (and SQLite's LIKE would end the pattern
                // at a NUL): refused rather than searched.
                if value.chars().count() > limits::NAME_QUERY_MAX
                    || value.chars().any(char::is_control)
                {
                    return Err(extract::bad_param(
                        &name,
                        "at most 256 characters, none of them a control character",
                    ));
                }
                // An empty search is no search.
                filter.name_contains = Some(value).filter(|v| !v.is_empty())
            }
            _ => return Err(extract::unknown_param(&name)),
        }
    }
    // Clerk lists keys of type `api_key` unless asked for another type.
    filter
        .key_type
        .get_or_insert_with(|| limits::KEY_TYPE_DEFAULT.to_owned());
    // Clerk lists only valid keys unless asked for invalid ones; explicit filters win.
    if !include_invalid {
        filter.revoked.get_or_insert(false);
        filter.expired.get_or_insert(false);
    }
    let page = state.service.list(&filter).await?;
    Ok(Json(KeyList {
        data: page
            .keys
            .into_iter()
            .map(|k| ApiKeyObject::new(k, now))
            .collect(),
        total_count: page.total_count,
    }))
}

async fn show(
    State(state): State<AppState>,
    KeyIdPath(id, _): KeyIdPath<Clerk>,
) -> Result<ApiKeyObject> {
    let key = state.service.get(&id).await?;
    Ok(Json(ApiKeyObject::new(key, system_now())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateRequest {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    /// `""` clears it.
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    /// `{}` clears them.
    #[serde(default)]
    claims: Option<Value>,
    /// Seconds from now (any JSON number), or `"never"`.
    #[serde(default)]
    seconds_until_expiration: Option<Expiry>,
    /// Absolute expiry in unix ms, or `"never"`.
    #[serde(default)]
    expiration: Option<Expiry>,
    /// `true` switches the key off, `false` on again.
    #[serde(default)]
    disabled: Option<bool>,
    /// Replaces the allowlist; `[]` lifts it.
    #[serde(default)]
    allowed_ips: Option<Vec<String>>,
}

async fn update(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    KeyIdPath(id, _): KeyIdPath<Clerk>,
    JsonBody(req, _): Body<UpdateRequest>,
) -> Result<ApiKeyObject> {
    let changes = KeyChanges {
        name: req.name,
        subject: req.subject,
        description: cleared_when_empty(req.description),
        scopes: req.scopes,
        claims: cleared_when_empty(req.claims),
        expiration: extract::lifetime(req.seconds_until_expiration, req.expiration)?,
        disabled: req.disabled,
        allowed_ips: req.allowed_ips,
    };
    let key = state.service.update(&actor, &id, changes).await?;
    Ok(Json(ApiKeyObject::new(key, system_now())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    #[serde(default)]
    revocation_reason: Option<String>,
}

async fn revoke(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    KeyIdPath(id, _): KeyIdPath<Clerk>,
    JsonBody(req, _): Body<RevokeRequest>,
) -> Result<ApiKeyObject> {
    let key = state
        .service
        .revoke(&actor, &id, req.revocation_reason)
        .await?;
    Ok(Json(ApiKeyObject::new(key, system_now())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollRequest {
    /// How long the old secret keeps working; 0 revokes it now.
    grace_period_seconds: i64,
    /// The new key's lifetime in seconds, or `"never"`; both absent keeps the old key's expiry.
    #[serde(default)]
    seconds_until_expiration: Option<Expiry>,
    /// The new key's expiry in unix ms, or `"never"`.
    #[serde(default)]
    expiration: Option<Expiry>,
}

/// The new key, its secret shown this once, and the key it replaced as the roll left it.
#[derive(Debug, Serialize)]
struct RollResponse {
    #[serde(flatten)]
    key: ApiKeyObject,
    previous: ApiKeyObject,
}

async fn roll(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    KeyIdPath(id, _): KeyIdPath<Clerk>,
    JsonBody(req, _): Body<RollRequest>,
) -> std::result::Result<(StatusCode, Json<RollResponse>), ApiError<Clerk>> {
    let roll = Roll {
        grace_period_seconds: req.grace_period_seconds,
        expiration: extract::lifetime(req.seconds_until_expiration, req.expiration)?,
    };
    let rolled = state.service.roll(&actor, &id, roll).await?;
    let now = system_now();
    let mut key = ApiKeyObject::new(rolled.key, now);
    key.secret = Some(rolled.secret.expose().to_owned());
    // A roll creates a key: 201, as create answers.
    Ok((
        StatusCode::CREATED,
        Json(RollResponse {
            key,
            previous: ApiKeyObject::new(rolled.previous, now),
        }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeakRequest {
    /// Where the key was found (a URL) or a note.
    #[serde(default)]
    source: Option<String>,
}

/// Reports a key as leaked by hand (a leak found elsewhere than by GitHub): what `LEAK_ACTION`
/// says, as for GitHub's alerts.
async fn report_leak(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    KeyIdPath(id, _): KeyIdPath<Clerk>,
    JsonBody(req, _): Body<LeakRequest>,
) -> Result<ApiKeyObject> {
    let leak = Leak {
        reported_by: "admin",
        source: req.source,
        action: state.leak_action,
        by_secret: false,
    };
    let key = state.service.report_leak(&actor, &id, &leak).await?;
    Ok(Json(ApiKeyObject::new(key, system_now())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyRequest {
    secret: String,
    #[serde(default, deserialize_with = "latchkey_shared::verify::null_as_default")]
    required_scopes: Vec<String>,
    /// Where the key is being used from, for keys with an allowlist.
    #[serde(default)]
    client_ip: Option<String>,
}

/// Answers the key object for a valid key, as Clerk's SDK expects; an error otherwise.
async fn verify(
    State(state): State<AppState>,
    JsonBody(req, _): Body<VerifyRequest>,
) -> Result<ApiKeyObject> {
    let outcome = state
        .service
        .verify(&req.secret, &req.required_scopes, req.client_ip.as_deref())
        .await?;
    let error = |status, code, message: &str| Err(ApiError::new(status, code, message));
    match (&outcome.verdict, outcome.key) {
        (Verdict::Valid, Some(key)) => Ok(Json(ApiKeyObject::new(key, system_now()))),
        (Verdict::Revoked, _) => error(
            StatusCode::NOT_FOUND,
            "api_key_revoked",
            "The API key has been revoked.",
        ),
        (Verdict::Expired, _) => error(
            StatusCode::NOT_FOUND,
            "api_key_expired",
            "The API key has expired.",
        ),
        (Verdict::Disabled, _) => error(
            StatusCode::NOT_FOUND,
            "api_key_disabled",
            "The API key is disabled.",
        ),
        (Verdict::IpNotAllowed, _) => error(
            StatusCode::FORBIDDEN,
            "api_key_ip_not_allowed",
            "The API key may not be used from this address.",
        ),
        (Verdict::Malformed, _) => error(
            StatusCode::NOT_FOUND,
            "api_key_malformed",
            "The secret is not a well-formed API key.",
        ),
        (Verdict::InsufficientScope { missing }, _) => {
            let missing: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "api_key_insufficient_scope",
                format!("The API key lacks required scopes: {}.", missing.join(", ")),
            ))
        }
        (Verdict::NotFound | Verdict::Valid, _) => error(
            StatusCode::NOT_FOUND,
            "api_key_not_found",
            "No API key matches this secret.",
        ),
    }
}

#[derive(Debug, Serialize)]
pub(super) struct AuditPage {
    data: Vec<AuditEntry>,
    /// Pass as `after` to get the next page; `null` when this page is the last.
    next_after: Option<i64>,
}

/// `GET /v1/audit_log?key_id=&after=&limit=`: entries oldest first.
pub(super) async fn audit_log(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<AuditPage> {
    let (mut key_id, mut after, mut limit) = (None::<KeyId>, 0i64, 100u32);
    for (name, value) in extract::query_pairs(query.as_deref())? {
        match name.as_str() {
            "key_id" => {
                key_id = Some(
                    KeyId::parse(&value)
                        .map_err(|_| extract::bad_param(&name, "a key id (key_…)"))?,
                )
            }
            "after" => after = i64::from(extract::parse_u32(&name, &value, 0..=u32::MAX)?),
            "limit" => {
                limit =
                    extract::parse_u32(&name, &value, 1..=crate::service::limits::LIST_LIMIT_MAX)?
            }
            _ => return Err(extract::unknown_param(&name)),
        }
    }
    let data = state
        .service
        .audit_log(key_id.as_ref(), after, limit)
        .await?;
    let next_after = (data.len() == limit as usize)
        .then(|| data.last().map(|e| e.seq))
        .flatten();
    Ok(Json(AuditPage { data, next_after }))
}

/// Parses `bytes` as each of this surface's JSON request bodies, as the handlers do; returns
/// how many accepted it (for the `origin_body` fuzz target).
pub(crate) fn parse_bodies(bytes: &[u8]) -> usize {
    [
        usize::from(extract::parse_json::<CreateRequest, Clerk>(bytes).is_ok()),
        usize::from(extract::parse_json::<UpdateRequest, Clerk>(bytes).is_ok()),
        usize::from(extract::parse_json::<RevokeRequest, Clerk>(bytes).is_ok()),
        usize::from(extract::parse_json::<RollRequest, Clerk>(bytes).is_ok()),
        usize::from(extract::parse_json::<LeakRequest, Clerk>(bytes).is_ok()),
        usize::from(extract::parse_json::<VerifyRequest, Clerk>(bytes).is_ok()),
    ]
    .iter()
    .sum()
}
