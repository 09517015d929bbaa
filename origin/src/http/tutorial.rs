//! The five calls of the Clerk tutorial our users start from, at its exact paths and shapes:
//! ISO-8601 times, `metadata` for claims, `key` for the secret, `{data,total_count,page,page_size}`
//! for list, and a verify that answers 200 with `valid:false` and a reason `code` for a bad key.

use axum::extract::{RawQuery, State};
use axum::http::Method;
use axum::{Extension, Json};
use latchkey_shared::{UnixMillis, Verdict, VerifyReport, VerifyRequest};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{ApiError, Tutorial};
use super::extract::{self, Expiry, JsonBody, Seconds, cleared_when_empty};
use super::routes::Routes;
use super::{Actor, AppState};
use crate::model::ListFilter;
use crate::service::{KeyChanges, NewKey, Roll, ServiceError, limits, system_now};

type Result<T> = std::result::Result<Json<T>, ApiError<Tutorial>>;
type Body<T> = JsonBody<T, Tutorial>;

/// Adds the tutorial's routes.
pub fn routes(table: Routes) -> Routes {
    table
        .admin::<Tutorial, _, _>(Method::POST, "/backend.api-keys.create", create)
        .admin::<Tutorial, _, _>(Method::POST, "/backend.api-keys.verify", verify)
        .admin::<Tutorial, _, _>(Method::GET, "/backend.api-keys.list", list)
        .admin::<Tutorial, _, _>(Method::DELETE, "/backend.api-keys.revoke", revoke)
        .admin::<Tutorial, _, _>(Method::PATCH, "/backend.api-keys.update", update)
        .admin::<Tutorial, _, _>(Method::POST, "/backend.api-keys.roll", roll)
}

/// ISO-8601 in UTC with milliseconds, e.g. `2024-01-15T10:30:00.000Z` (the edge prints the same).
fn iso(t: UnixMillis) -> String {
    t.to_iso8601()
}

/// This surface calls claims `metadata`: name the field as the caller sent it.
fn as_metadata(error: ServiceError) -> ServiceError {
    match error {
        ServiceError::Invalid {
            field: "claims",
            message,
        } => ServiceError::Invalid {
            field: "metadata",
            message,
        },
        other => other,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    name: String,
    #[serde(default, deserialize_with = "latchkey_shared::verify::null_as_default")]
    scopes: Vec<String>,
    #[serde(default)]
    metadata: Option<Value>,
    /// Not in the tutorial: defaults to `metadata.partner_id`, then to `default`.
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    description: Option<String>,
    /// Any JSON number of seconds, whole or not, as on the Clerk surface.
    #[serde(default)]
    seconds_until_expiration: Option<Seconds>,
    /// Not in the tutorial: addresses and CIDR ranges the key may be used from.
    #[serde(default, deserialize_with = "latchkey_shared::verify::null_as_default")]
    allowed_ips: Vec<String>,
}

#[derive(Debug, Serialize)]
struct CreateResponse {
    id: String,
    name: String,
    scopes: Vec<String>,
    key: String,
    created_at: String,
    metadata: Option<Map<String, Value>>,
    expires_at: Option<String>,
    /// Shown only when set, so the tutorial's shape is unchanged without it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allowed_ips: Vec<String>,
}

async fn create(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    JsonBody(req, _): Body<CreateRequest>,
) -> Result<CreateResponse> {
    let subject = req.subject.or_else(|| {
        req.metadata
            .as_ref()
            .and_then(|m| m.get("partner_id"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let new = NewKey {
        name: req.name,
        subject: subject.unwrap_or_else(|| "default".to_owned()),
        description: req.description,
        scopes: req.scopes,
        claims: req.metadata,
        lifetime_ms: req.seconds_until_expiration.map(Seconds::millis),
        key_type: None,
        created_by: None,
        allowed_ips: req.allowed_ips,
    };
    let (key, secret) = state
        .service
        .create(&actor, new)
        .await
        .map_err(as_metadata)?;
    Ok(Json(CreateResponse {
        id: key.id.to_string(),
        name: key.name,
        scopes: key.scopes.to_strings(),
        key: secret.expose().to_owned(),
        created_at: iso(key.created_at),
        metadata: key.claims,
        expires_at: key.expiration.map(iso),
        allowed_ips: key.allowed_ips.to_strings(),
    }))
}

#[derive(Debug, Serialize)]
struct VerifyResponse {
    /// The fields the edge answers too, built by the same function.
    #[serde(flatten)]
    report: VerifyReport,
    created_at: Option<String>,
    last_used_at: Option<String>,
}

/// Always 200 for a well-formed request: `valid` and `code` say whether the key passes.
async fn verify(
    State(state): State<AppState>,
    JsonBody(req, _): Body<VerifyRequest>,
) -> Result<VerifyResponse> {
    let outcome = state
        .service
        .verify(&req.key, &req.required_scopes, req.client_ip.as_deref())
        .await?;
    // From an address its allowlist does not hold, a key is reported as good as unknown (as
    // `VerifyReport` does).
    let key = outcome
        .key
        .filter(|_| !matches!(outcome.verdict, Verdict::IpNotAllowed));
    Ok(Json(VerifyResponse {
        report: VerifyReport::new(&outcome.verdict, outcome.record.as_ref()),
        created_at: key.as_ref().map(|k| iso(k.created_at)),
        last_used_at: key.as_ref().and_then(|k| k.last_used_at).map(iso),
    }))
}

#[derive(Debug, Serialize)]
struct ListItem {
    id: String,
    name: String,
    subject: String,
    scopes: Vec<String>,
    created_at: String,
    last_used_at: Option<String>,
    revoked: bool,
    /// Shown only when `true`: a key never disabled answers the tutorial's shape exactly.
    #[serde(skip_serializing_if = "is_false")]
    disabled: bool,
    expires_at: Option<String>,
    metadata: Option<Map<String, Value>>,
    /// Shown only when set, like `disabled`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allowed_ips: Vec<String>,
    /// Shown only when set: the key this one replaced in a roll.
    #[serde(skip_serializing_if = "Option::is_none")]
    rolled_from: Option<String>,
    /// Shown only when set: the key that replaced this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    rolled_to: Option<String>,
    /// Shown only when set: when the key was reported as leaked.
    #[serde(skip_serializing_if = "Option::is_none")]
    leaked_at: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !b
}

#[derive(Debug, Serialize)]
struct ListResponse {
    data: Vec<ListItem>,
    total_count: u64,
    page: u32,
    page_size: u32,
}

/// Every key, revoked and expired included (the tutorial filters them client-side), newest first;
/// deleted keys (Clerk's delete) never.
async fn list(State(state): State<AppState>, RawQuery(query): RawQuery) -> Result<ListResponse> {
    let mut filter = ListFilter {
        now: system_now(),
        limit: 50,
        ..ListFilter::default()
    };
    let mut page = 1u32;
    for (name, value) in extract::query_pairs(query.as_deref())? {
        if extract::apply_filter_param(&mut filter, &name, &value)? {
            continue;
        }
        match name.as_str() {
            "limit" | "page_size" => {
                filter.limit = extract::parse_u32(&name, &value, 1..=limits::LIST_LIMIT_MAX)?
            }
            "page" => page = extract::parse_u32(&name, &value, 1..=1_000_000)?,
            _ => return Err(extract::unknown_param(&name)),
        }
    }
    filter.offset = (page - 1).saturating_mul(filter.limit);
    let result = state.service.list(&filter).await?;
    Ok(Json(ListResponse {
        data: result
            .keys
            .into_iter()
            .map(|k| ListItem {
                id: k.id.to_string(),
                name: k.name,
                subject: k.subject,
                scopes: k.scopes.to_strings(),
                created_at: iso(k.created_at),
                last_used_at: k.last_used_at.map(iso),
                revoked: k.revoked,
                disabled: k.disabled,
                expires_at: k.expiration.map(iso),
                allowed_ips: k.allowed_ips.to_strings(),
                rolled_from: k.rolled_from.map(|id| id.to_string()),
                rolled_to: k.rolled_to.map(|id| id.to_string()),
                leaked_at: k.leaked_at.map(iso),
                metadata: k.claims,
            })
            .collect(),
        total_count: result.total_count,
        page,
        page_size: filter.limit,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    key_id: String,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Serialize)]
struct RevokeResponse {
    id: String,
    revoked: bool,
    revoked_at: Option<String>,
    success: bool,
}

async fn revoke(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    JsonBody(req, _): Body<RevokeRequest>,
) -> Result<RevokeResponse> {
    let id = extract::body_key_id(&req.key_id, "key_id")?;
    let key = state.service.revoke(&actor, &id, req.reason).await?;
    Ok(Json(RevokeResponse {
        id: key.id.to_string(),
        revoked: key.revoked,
        revoked_at: key.revoked_at.map(iso),
        success: true,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateRequest {
    key_id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    /// `{}` clears it.
    #[serde(default)]
    metadata: Option<Value>,
    /// `""` clears it.
    #[serde(default)]
    description: Option<String>,
    /// Seconds from now, or `"never"`.
    #[serde(default)]
    seconds_until_expiration: Option<Expiry>,
    /// `true` switches the key off, `false` on again.
    #[serde(default)]
    disabled: Option<bool>,
    /// Replaces the allowlist; `[]` lifts it.
    #[serde(default)]
    allowed_ips: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
struct UpdateResponse {
    id: String,
    name: String,
    scopes: Vec<String>,
    /// Shown only when `true`, as in the list.
    #[serde(skip_serializing_if = "is_false")]
    disabled: bool,
    /// Shown only when set, as in the list.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allowed_ips: Vec<String>,
    metadata: Option<Map<String, Value>>,
    updated_at: String,
}

async fn update(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    JsonBody(req, _): Body<UpdateRequest>,
) -> Result<UpdateResponse> {
    let id = extract::body_key_id(&req.key_id, "key_id")?;
    let changes = KeyChanges {
        name: req.name,
        subject: None,
        description: cleared_when_empty(req.description),
        scopes: req.scopes,
        claims: cleared_when_empty(req.metadata),
        expiration: extract::lifetime(req.seconds_until_expiration, None)?,
        disabled: req.disabled,
        allowed_ips: req.allowed_ips,
    };
    let key = state
        .service
        .update(&actor, &id, changes)
        .await
        .map_err(as_metadata)?;
    Ok(Json(UpdateResponse {
        id: key.id.to_string(),
        name: key.name,
        scopes: key.scopes.to_strings(),
        disabled: key.disabled,
        allowed_ips: key.allowed_ips.to_strings(),
        metadata: key.claims,
        updated_at: iso(key.updated_at),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollRequest {
    key_id: String,
    /// How long the old key keeps working; 0 revokes it now.
    grace_period_seconds: i64,
    /// The new key's lifetime in seconds (`"never"`: no expiry); absent keeps the old key's.
    #[serde(default)]
    seconds_until_expiration: Option<Expiry>,
}

/// What the replaced key became.
#[derive(Debug, Serialize)]
struct Previous {
    id: String,
    /// The end of its grace period (or its own expiry, if sooner).
    expires_at: Option<String>,
    revoked: bool,
    revoked_at: Option<String>,
}

/// Shaped like create's answer (the new secret is `key`, shown this once), plus the link and
/// what became of the replaced key.
#[derive(Debug, Serialize)]
struct RollResponse {
    id: String,
    name: String,
    scopes: Vec<String>,
    key: String,
    created_at: String,
    metadata: Option<Map<String, Value>>,
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allowed_ips: Vec<String>,
    #[serde(skip_serializing_if = "is_false")]
    disabled: bool,
    rolled_from: String,
    previous: Previous,
}

async fn roll(
    State(state): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    JsonBody(req, _): Body<RollRequest>,
) -> Result<RollResponse> {
    let id = extract::body_key_id(&req.key_id, "key_id")?;
    let roll = Roll {
        grace_period_seconds: req.grace_period_seconds,
        expiration: extract::lifetime(req.seconds_until_expiration, None)?,
    };
    let rolled = state.service.roll(&actor, &id, roll).await?;
    let (key, previous) = (rolled.key, rolled.previous);
    Ok(Json(RollResponse {
        id: key.id.to_string(),
        name: key.name,
        scopes: key.scopes.to_strings(),
        key: rolled.secret.expose().to_owned(),
        created_at: iso(key.created_at),
        metadata: key.claims,
        expires_at: key.expiration.map(iso),
        allowed_ips: key.allowed_ips.to_strings(),
        disabled: key.disabled,
        rolled_from: previous.id.to_string(),
        previous: Previous {
            id: previous.id.to_string(),
            expires_at: previous.expiration.map(iso),
            revoked: previous.revoked,
            revoked_at: previous.revoked_at.map(iso),
        },
    }))
}

/// Parses `bytes` as each of this surface's JSON request bodies, as the handlers do; returns
/// how many accepted it (for the `origin_body` fuzz target).
pub(crate) fn parse_bodies(bytes: &[u8]) -> usize {
    [
        usize::from(extract::parse_json::<CreateRequest, Tutorial>(bytes).is_ok()),
        usize::from(extract::parse_json::<UpdateRequest, Tutorial>(bytes).is_ok()),
        usize::from(extract::parse_json::<RevokeRequest, Tutorial>(bytes).is_ok()),
        usize::from(extract::parse_json::<RollRequest, Tutorial>(bytes).is_ok()),
        usize::from(extract::parse_json::<VerifyRequest, Tutorial>(bytes).is_ok()),
    ]
    .iter()
    .sum()
}
