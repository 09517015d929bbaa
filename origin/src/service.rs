//! The key service: every operation of both API surfaces, independent of HTTP.
//!
//! Handlers translate requests into these calls and results into their surface's JSON; the
//! service validates input, applies the scope policy, decides verifications with the shared
//! [`decide`] function, and writes through a [`KeyStore`].

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use latchkey_shared::ip::IpAllowlist;
use latchkey_shared::{
    ApiKey, DecisionContext, KeyId, KeyPrefix, KeyRecord, PRESENTED_MAX, REQUIRED_SCOPES_MAX,
    ScopePolicy, UnixMillis, Verdict, decide, parse_presented, parse_required,
};
use serde_json::{Map, Value, json};

use crate::model::{AuditEntry, AuditEvent, KeyPage, ListFilter, StoredKey};
use crate::store::{KeyStore, StoreError};
use crate::usage::UsageTracker;

/// Input limits. They are part of the API contract and listed in the README.
pub mod limits {
    /// Longest `name`, in characters.
    pub const NAME_MAX: usize = 256;
    /// Longest `subject`, in characters.
    pub const SUBJECT_MAX: usize = 256;
    /// Longest `description`, in characters.
    pub const DESCRIPTION_MAX: usize = 1024;
    /// Longest `created_by`, in characters.
    pub const CREATED_BY_MAX: usize = 256;
    /// Shortest and longest key `type`, in characters (Clerk's bounds).
    pub const KEY_TYPE_LEN: std::ops::RangeInclusive<usize> = 3..=25;
    /// The key type of a create that names none.
    pub const KEY_TYPE_DEFAULT: &str = "api_key";
    /// Longest name search text (Clerk's `query`), in characters.
    pub const NAME_QUERY_MAX: usize = 256;
    /// Longest `revocation_reason`, in characters.
    pub const REVOCATION_REASON_MAX: usize = 512;
    /// Longest leak source (a URL or a note), in characters.
    pub const LEAK_SOURCE_MAX: usize = 512;
    /// Longest grace period of a roll, in seconds (ninety days).
    pub const GRACE_PERIOD_MAX_SECONDS: i64 = 90 * 24 * 3600;
    /// Most scopes on one key (the most one verification may require, too).
    pub const SCOPES_MAX: usize = super::REQUIRED_SCOPES_MAX;
    /// Longest requested scope kept in the audit entry of a refused grant, in characters.
    pub const SCOPE_AUDIT_CHARS_MAX: usize = 128;
    /// Largest `claims` / `metadata` object, serialised, in bytes.
    pub const CLAIMS_MAX_BYTES: usize = 4096;
    /// Deepest nesting of `claims` / `metadata`.
    pub const CLAIMS_MAX_DEPTH: usize = 8;
    /// Longest lifetime, in seconds (ten years).
    pub const EXPIRATION_MAX_SECONDS: i64 = 10 * 365 * 24 * 3600;
    /// Largest page of a listing.
    pub const LIST_LIMIT_MAX: u32 = 500;
    /// Largest request body, in bytes.
    pub const BODY_MAX_BYTES: usize = 64 * 1024;
    /// Longest presented secret looked at by verify; longer ones are malformed without parsing.
    pub const SECRET_MAX: usize = super::PRESENTED_MAX;
}

/// Why an operation failed. Only `Store` is the service's own fault.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The input is unacceptable; `field` names the offending field.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, as named in the request.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// No key has this id.
    #[error("no API key with this id")]
    NotFound,
    /// The key is revoked and cannot change any more.
    #[error("the API key is revoked and cannot be updated")]
    Revoked,
    /// The key has expired: it cannot be rolled.
    #[error("the API key has expired")]
    Expired,
    /// The key was rolled before; only its successor can be rolled.
    #[error("the API key was already rolled, to {0}")]
    AlreadyRolled(KeyId),
    /// Concurrent changes kept winning; the caller may retry.
    #[error("the API key was changed concurrently; retry")]
    Conflict,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An allowlist as given to create or update.
fn allowlist(entries: &[String]) -> Result<IpAllowlist, ServiceError> {
    IpAllowlist::parse(entries).map_err(|e| invalid("allowed_ips", e.to_string()))
}

fn invalid(field: &'static str, message: impl Into<String>) -> ServiceError {
    ServiceError::Invalid {
        field,
        message: message.into(),
    }
}

/// A key to create.
#[derive(Debug, Default)]
pub struct NewKey {
    /// Required, 1..=256 characters.
    pub name: String,
    /// Required, 1..=256 characters.
    pub subject: String,
    /// Optional free text.
    pub description: Option<String>,
    /// Scopes to grant, checked against the policy.
    pub scopes: Vec<String>,
    /// Optional JSON object.
    pub claims: Option<Value>,
    /// Lifetime in milliseconds (a request's seconds, rounded up to a whole millisecond and
    /// saturated, so any number is safe to check); `None` never expires.
    pub lifetime_ms: Option<i64>,
    /// Clerk's key type; `None` is `api_key`.
    pub key_type: Option<String>,
    /// Who asked (free text).
    pub created_by: Option<String>,
    /// Addresses and CIDR ranges the key may be used from (empty: anywhere).
    pub allowed_ips: Vec<String>,
}

/// Changes to a key. `None` leaves a field alone; `Some(None)` clears a clearable one.
#[derive(Debug, Default)]
pub struct KeyChanges {
    /// New name.
    pub name: Option<String>,
    /// New subject.
    pub subject: Option<String>,
    /// New description, or clear it.
    pub description: Option<Option<String>>,
    /// Replacement scope list.
    pub scopes: Option<Vec<String>>,
    /// Replacement claims, or clear them.
    pub claims: Option<Option<Value>>,
    /// New expiry, if it changes.
    pub expiration: Option<Lifetime>,
    /// Switch the key off (`true`) or on again (`false`).
    pub disabled: Option<bool>,
    /// Replacement allowlist (empty: anywhere).
    pub allowed_ips: Option<Vec<String>>,
}

pub use crate::config::LeakAction;

/// A report that a key leaked.
#[derive(Debug, Clone)]
pub struct Leak {
    /// Who found it: `github_secret_scanning`, or `admin` for a manual report.
    pub reported_by: &'static str,
    /// Where it was found (a URL), or a note.
    pub source: Option<String>,
    /// What to do about it.
    pub action: LeakAction,
    /// The key was found by its secret (GitHub's alert), not named by id: a deleted key is
    /// reported too (an admin naming a deleted key by id gets 404, as for every other call).
    pub by_secret: bool,
}

/// A roll, as requested.
#[derive(Debug)]
pub struct Roll {
    /// How long the replaced key keeps working, in seconds: 0 revokes it at once. Never past
    /// its own expiry.
    pub grace_period_seconds: i64,
    /// The new key's expiry; `None` keeps the replaced key's.
    pub expiration: Option<Lifetime>,
}

/// The outcome of a roll.
#[derive(Debug)]
pub struct Rolled {
    /// The replaced key, as the roll left it (`rolled_to` set, its grace period as its expiry,
    /// or revoked).
    pub previous: StoredKey,
    /// The new key.
    pub key: StoredKey,
    /// The new key's secret, which exists only here.
    pub secret: ApiKey,
}

/// When a key expires, as a request states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Never.
    Never,
    /// This many milliseconds from now (a request's seconds, rounded up to a whole
    /// millisecond and saturated, so any number is safe to check).
    Millis(i64),
    /// At this instant.
    At(UnixMillis),
}

/// The outcome of a verification: the verdict and, if the key exists, its current state.
#[derive(Debug)]
pub struct Verification {
    /// What the shared decision function answered.
    pub verdict: Verdict,
    /// The key, if the secret matched one.
    pub key: Option<StoredKey>,
    /// The key's record as the decision saw it (the edge's view of the same key).
    pub record: Option<KeyRecord>,
}

/// The time source. Real time in production; tests of the HTTP API use real time too.
pub fn system_now() -> UnixMillis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    UnixMillis(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// Fills `buf` from the OS CSPRNG. Without it no key can be issued safely, so failure aborts.
fn os_random(buf: &mut [u8]) {
    #[allow(
        clippy::panic,
        reason = "issuing a key from a failed CSPRNG would be worse than stopping"
    )]
    if let Err(e) = getrandom::fill(buf) {
        panic!("the OS random number generator failed: {e}");
    }
}

/// The key service.
pub struct KeyService {
    store: Arc<dyn KeyStore>,
    policy: ScopePolicy,
    prefix: KeyPrefix,
    usage: UsageTracker,
    /// Changes to one key queue here instead of racing to the database (striped by key id).
    change_locks: Vec<tokio::sync::Mutex<()>>,
    /// Fired after every committed change, to wake the KV publisher at once.
    committed: Arc<tokio::sync::Notify>,
    /// The same, for the ledger publisher (a `Notify` wakes one waiter).
    ledger_committed: Arc<tokio::sync::Notify>,
    /// Counts commits, for every webhook deliverer (a `watch` wakes them all).
    commits: tokio::sync::watch::Sender<u64>,
}

/// Who the audit log names for the stale-key policy's changes and warnings.
pub const STALE_POLICY_ACTOR: &str = "policy:stale_keys";
/// Who the audit log names for expiry warnings.
pub const EXPIRY_POLICY_ACTOR: &str = "policy:expiry_warning";

/// Number of stripes in `change_locks`: changes to different keys rarely wait for each other.
const CHANGE_LOCK_STRIPES: usize = 64;

impl KeyService {
    /// A service over `store`, issuing keys with `prefix` under `policy`.
    pub fn new(store: Arc<dyn KeyStore>, prefix: KeyPrefix, policy: ScopePolicy) -> Self {
        Self {
            store,
            policy,
            prefix,
            usage: UsageTracker::default(),
            change_locks: (0..CHANGE_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            committed: Arc::new(tokio::sync::Notify::new()),
            ledger_committed: Arc::new(tokio::sync::Notify::new()),
            commits: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes with every committed change (the webhook deliverers wait on it).
    pub fn subscribe_commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// Fires after every committed change (the KV publisher waits on it).
    pub fn committed(&self) -> Arc<tokio::sync::Notify> {
        self.committed.clone()
    }

    /// Fires after every committed change (the ledger publisher waits on it).
    pub fn ledger_committed(&self) -> Arc<tokio::sync::Notify> {
        self.ledger_committed.clone()
    }

    /// Wakes both publishers after a commit.
    fn announce_commit(&self) {
        self.committed.notify_one();
        self.ledger_committed.notify_one();
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The store, for health checks and shutdown.
    pub fn store(&self) -> &dyn KeyStore {
        self.store.as_ref()
    }

    /// Records a use of `id` reported by the edge (written with the next usage flush).
    pub fn record_use(&self, id: &KeyId, at: UnixMillis) {
        self.usage.touch(id, at);
    }

    /// Admits a usage batch the edge signed, named by its MAC, once: `false` if it was
    /// admitted before (a replay). It is remembered until `until`, across restarts.
    pub async fn admit_usage_batch(
        &self,
        mac: &[u8; 32],
        until: UnixMillis,
        now: UnixMillis,
    ) -> Result<bool, StoreError> {
        self.store.remember_usage_batch(mac, until, now).await
    }

    /// Writes pending `last_used_at` times.
    pub async fn flush_usage(&self) -> Result<usize, StoreError> {
        self.usage.flush(self.store.as_ref()).await
    }

    /// Issues a key. Returns the stored state and the plaintext secret, which exists only here.
    pub async fn create(
        &self,
        actor: &str,
        new: NewKey,
    ) -> Result<(StoredKey, ApiKey), ServiceError> {
        let now = system_now();
        let name = text("name", &new.name, limits::NAME_MAX)?;
        let subject = text("subject", &new.subject, limits::SUBJECT_MAX)?;
        let description = optional_text("description", new.description, limits::DESCRIPTION_MAX)?;
        let created_by = optional_text("created_by", new.created_by, limits::CREATED_BY_MAX)?;
        let scopes = self.grant(actor, None, &new.scopes).await?;
        let allowed_ips = allowlist(&new.allowed_ips)?;
        let claims = new.claims.map(claims).transpose()?.flatten();
        let key_type = match new.key_type {
            Some(t) => key_type(&t)?,
            None => limits::KEY_TYPE_DEFAULT.to_owned(),
        };
        let expiration = new.lifetime_ms.map(|ms| expires_at(now, ms)).transpose()?;

        let secret = ApiKey::generate(&self.prefix, &mut os_random);
        let key = StoredKey {
            id: KeyId::generate(&mut os_random),
            hash: secret.hash(),
            hint: secret.hint().as_str().to_owned(),
            name,
            subject,
            description,
            scopes,
            claims,
            created_by,
            expiration,
            revoked: false,
            revoked_at: None,
            revocation_reason: None,
            last_used_at: None,
            created_at: now,
            updated_at: now,
            revision: 1,
            disabled: false,
            allowed_ips,
            rolled_from: None,
            rolled_to: None,
            leaked_at: None,
            leak_source: None,
            key_type,
            deleted_at: None,
        };
        let event = AuditEvent {
            at: now,
            actor: actor.to_owned(),
            action: "create",
            key_id: Some(key.id.clone()),
            details: json!({
                "name": key.name,
                "subject": key.subject,
                "scopes": key.scopes,
                "expiration": key.expiration,
                "hint": key.hint,
                "allowed_ips": key.allowed_ips,
                "type": key.key_type,
            }),
        };
        self.store.insert(&key, &event).await?;
        self.announce_commit();
        Ok((key, secret))
    }

    /// A key by id, with its latest use. A deleted key is not found.
    pub async fn get(&self, id: &KeyId) -> Result<StoredKey, ServiceError> {
        let key = self.existing(id).await?;
        Ok(self.with_usage(key))
    }

    /// The stored key, unless it does not exist or was deleted.
    async fn existing(&self, id: &KeyId) -> Result<StoredKey, ServiceError> {
        match self.store.get(id).await? {
            Some(key) if key.deleted_at.is_none() => Ok(key),
            _ => Err(ServiceError::NotFound),
        }
    }

    /// A page of keys.
    pub async fn list(&self, filter: &ListFilter) -> Result<KeyPage, ServiceError> {
        if filter.limit == 0 || filter.limit > limits::LIST_LIMIT_MAX {
            return Err(invalid(
                "limit",
                format!("must be from 1 to {}", limits::LIST_LIMIT_MAX),
            ));
        }
        if filter.never_used.is_some() || filter.last_used_before.is_some() {
            // These filters run in the database: write pending uses first so they are exact.
            self.flush_usage().await?;
        }
        let mut page = self.store.list(filter).await?;
        page.keys = page.keys.into_iter().map(|k| self.with_usage(k)).collect();
        Ok(page)
    }

    /// Changes a live key. Scopes are replaced as a whole (narrowing is replacing with fewer);
    /// the secret stays the same.
    pub async fn update(
        &self,
        actor: &str,
        id: &KeyId,
        changes: KeyChanges,
    ) -> Result<StoredKey, ServiceError> {
        // Validate once, before touching storage.
        let name = changes
            .name
            .map(|n| text("name", &n, limits::NAME_MAX))
            .transpose()?;
        let subject = changes
            .subject
            .map(|s| text("subject", &s, limits::SUBJECT_MAX))
            .transpose()?;
        let description = changes
            .description
            .map(|d| optional_text("description", d, limits::DESCRIPTION_MAX))
            .transpose()?;
        let scopes = match changes.scopes.as_deref() {
            Some(requested) => {
                // An unknown or deleted key is a 404 before any refused grant is audited.
                self.existing(id).await?;
                Some(self.grant(actor, Some(id), requested).await?)
            }
            None => None,
        };
        let claims = changes
            .claims
            .map(|c| c.map(claims).transpose().map(Option::flatten))
            .transpose()?;
        let lifetime = changes.expiration;
        let disabled = changes.disabled;
        let allowed_ips = changes.allowed_ips.as_deref().map(allowlist).transpose()?;

        self.change(actor, id, "update", Deleted::NotFound, |key, now| {
            if key.revoked {
                return Err(ServiceError::Revoked);
            }
            let mut diff = Map::new();
            let note = |diff: &mut Map<String, Value>, field: &str, from: Value, to: Value| {
                if from != to {
                    diff.insert(field.to_owned(), json!({ "from": from, "to": to }));
                }
            };
            if let Some(name) = &name {
                note(&mut diff, "name", json!(key.name), json!(name));
                key.name.clone_from(name);
            }
            if let Some(subject) = &subject {
                note(&mut diff, "subject", json!(key.subject), json!(subject));
                key.subject.clone_from(subject);
            }
            if let Some(description) = &description {
                note(
                    &mut diff,
                    "description",
                    json!(key.description),
                    json!(description),
                );
                key.description.clone_from(description);
            }
            if let Some(scopes) = &scopes {
                note(&mut diff, "scopes", json!(key.scopes), json!(scopes));
                key.scopes = scopes.clone();
            }
            if let Some(claims) = &claims {
                // Claims are caller data: record that they changed, not their content.
                if key.claims != *claims {
                    diff.insert("claims".into(), json!("changed"));
                }
                key.claims.clone_from(claims);
            }
            if let Some(lifetime) = lifetime {
                if key.rolled_to.is_some() {
                    // The grace period a roll gave is the operator's promise to the partner
                    // that the old secret stops; it does not move.
                    return Err(invalid(
                        "expiration",
                        "the key was rolled: its grace period cannot change (revoke it to end it now)",
                    ));
                }
                let expiration = expiry(now, lifetime)?;
                note(
                    &mut diff,
                    "expiration",
                    json!(key.expiration),
                    json!(expiration),
                );
                key.expiration = expiration;
            }
            if let Some(disabled) = disabled {
                note(&mut diff, "disabled", json!(key.disabled), json!(disabled));
                key.disabled = disabled;
            }
            if let Some(allowed_ips) = &allowed_ips {
                note(
                    &mut diff,
                    "allowed_ips",
                    json!(key.allowed_ips),
                    json!(allowed_ips),
                );
                key.allowed_ips.clone_from(allowed_ips);
            }
            Ok(Some(json!({ "changes": diff })))
        })
        .await
    }

    /// Revokes a key, at once and for good. Revoking a revoked key changes nothing and returns
    /// it with its original `revoked_at`.
    pub async fn revoke(
        &self,
        actor: &str,
        id: &KeyId,
        reason: Option<String>,
    ) -> Result<StoredKey, ServiceError> {
        let reason = optional_text("revocation_reason", reason, limits::REVOCATION_REASON_MAX)?;
        self.change(actor, id, "revoke", Deleted::NotFound, |key, now| {
            if key.revoked {
                // Already revoked (perhaps a moment ago by another request): change nothing.
                return Ok(None);
            }
            key.revoked = true;
            key.revoked_at = Some(now);
            key.revocation_reason.clone_from(&reason);
            Ok(Some(json!({ "reason": reason })))
        })
        .await
    }

    /// Deletes a key, as Clerk's `DELETE /api_keys/{id}` asks: revoked at once if it was not
    /// (its reason `deleted`), then hidden from every list and read by id, which answer 404 from
    /// then on, as does a second delete. Nothing is erased: the row stays, with the secret's
    /// hash, so the secret can never verify again (it answers `REVOKED`, at the edge too), and
    /// so do the key's audit entries, the deletion among them (`delete`, an
    /// `api_key.deleted` event).
    pub async fn delete(&self, actor: &str, id: &KeyId) -> Result<StoredKey, ServiceError> {
        self.change(actor, id, "delete", Deleted::NotFound, |key, now| {
            let revoke = !key.revoked;
            if revoke {
                key.revoked = true;
                key.revoked_at = Some(now);
                key.revocation_reason = Some("deleted".to_owned());
            }
            key.deleted_at = Some(now);
            Ok(Some(json!({ "revoked": revoke })))
        })
        .await
    }

    /// Records that a key leaked: where it was found (`leak.source`, a URL or a note) and by
    /// whom. With [`LeakAction::Revoke`] the key is revoked at once, its reason naming the
    /// source; with [`LeakAction::Flag`] it keeps working, marked (`leaked_at`) for its owner to
    /// roll. Reports are idempotent: a key already marked (and revoked, if that is the action)
    /// is returned unchanged, so a retried report writes nothing; the first report's source is
    /// kept. Audited as `leak`.
    pub async fn report_leak(
        &self,
        actor: &str,
        id: &KeyId,
        leak: &Leak,
    ) -> Result<StoredKey, ServiceError> {
        let source = optional_text("source", leak.source.clone(), limits::LEAK_SOURCE_MAX)?;
        let deleted = if leak.by_secret {
            Deleted::Found
        } else {
            Deleted::NotFound
        };
        self.change(actor, id, "leak", deleted, |key, now| {
            let revoke = leak.action == LeakAction::Revoke && !key.revoked;
            if key.leaked_at.is_some() && !revoke {
                return Ok(None);
            }
            if key.leaked_at.is_none() {
                key.leaked_at = Some(now);
                key.leak_source.clone_from(&source);
            }
            if revoke {
                key.revoked = true;
                key.revoked_at = Some(now);
                let reason = match &source {
                    Some(source) => format!("leaked: {source}"),
                    None => "leaked".to_owned(),
                };
                key.revocation_reason =
                    Some(reason.chars().take(limits::REVOCATION_REASON_MAX).collect());
            }
            Ok(Some(json!({
                "reported_by": leak.reported_by,
                "source": source,
                "action": leak.action,
                "revoked": revoke,
            })))
        })
        .await
    }

    /// Switches off a key the stale-key policy found idle since before `idle_before`, unless it
    /// was used (in this process: written or still in memory), changed, disabled or revoked
    /// since. Audited as an update by
    /// `policy:stale_keys` (an `api_key.disabled` event); enabling it again is the usual update,
    /// and restarts its idle time.
    pub async fn disable_stale(
        &self,
        id: &KeyId,
        idle_before: UnixMillis,
    ) -> Result<StoredKey, ServiceError> {
        // A use still in memory counts: the key was verified after the usage flush.
        let pending = self.usage.pending(id);
        self.change(
            STALE_POLICY_ACTOR,
            id,
            "update",
            // A key deleted since the policy listed it is revoked: skipped below, not an
            // error that would end the policy's pass.
            Deleted::Found,
            |key, now| {
                let active = key
                    .last_used_at
                    .max(pending)
                    .unwrap_or(UnixMillis(0))
                    .max(key.updated_at);
                if key.revoked || key.disabled || key.is_expired(now) || active >= idle_before {
                    return Ok(None);
                }
                key.disabled = true;
                Ok(Some(json!({
                    "changes": { "disabled": { "from": false, "to": true } },
                    "policy": "stale_keys",
                    "idle_since": active,
                })))
            },
        )
        .await
    }

    /// Appends a policy's warning about `key` (`stale_warning`, `expiry_warning`) to the audit
    /// log, which delivers it as an event; the key does not change.
    pub async fn warn(
        &self,
        actor: &str,
        key: &StoredKey,
        action: &'static str,
        details: Value,
    ) -> Result<(), ServiceError> {
        let event = AuditEvent {
            at: system_now(),
            actor: actor.to_owned(),
            action,
            key_id: Some(key.id.clone()),
            details,
        };
        self.store.record_event(&event).await?;
        self.announce_commit();
        Ok(())
    }

    /// The key whose secret is `presented`, if any (for leak reports: no decision, no use).
    pub async fn key_for_secret(&self, presented: &str) -> Result<Option<StoredKey>, ServiceError> {
        match parse_presented(presented) {
            Ok(secret) => Ok(self.store.find_by_hash(&secret.hash()).await?),
            Err(_) => Ok(None),
        }
    }

    /// Rolls a live key: issues a new secret as a new key that copies the old one's settings
    /// (name, subject, description, scopes, claims, creator, expiry unless `roll` gives one,
    /// disabled, allowed IPs, type) and names it in `rolled_from`. The old key names its successor in
    /// `rolled_to` and keeps working for the grace period (its expiry becomes the earlier of
    /// its own and the end of the grace period), or is revoked at once for a grace period of
    /// 0. Both changes, and both audit entries, commit together or not at all.
    ///
    /// A key is rolled once: a revoked, expired or already rolled key is refused (roll its
    /// successor instead).
    pub async fn roll(&self, actor: &str, id: &KeyId, roll: Roll) -> Result<Rolled, ServiceError> {
        let grace = roll.grace_period_seconds;
        if !(0..=limits::GRACE_PERIOD_MAX_SECONDS).contains(&grace) {
            return Err(invalid(
                "grace_period_seconds",
                format!(
                    "must be from 0 (revoke the old key now) to {} seconds",
                    limits::GRACE_PERIOD_MAX_SECONDS
                ),
            ));
        }
        let _turn = self.take_turn(id).await;
        for _ in 0..8 {
            let current = self.existing(id).await?;
            let now = system_now();
            if current.revoked {
                return Err(ServiceError::Revoked);
            }
            if let Some(successor) = &current.rolled_to {
                return Err(ServiceError::AlreadyRolled(successor.clone()));
            }
            if current.is_expired(now) {
                return Err(ServiceError::Expired);
            }
            let expiration = match roll.expiration {
                Some(lifetime) => expiry(now, lifetime)?,
                None => current.expiration,
            };
            let secret = ApiKey::generate(&self.prefix, &mut os_random);
            let key = StoredKey {
                id: KeyId::generate(&mut os_random),
                hash: secret.hash(),
                hint: secret.hint().as_str().to_owned(),
                expiration,
                revoked: false,
                revoked_at: None,
                revocation_reason: None,
                last_used_at: None,
                created_at: now,
                updated_at: now,
                revision: 1,
                rolled_from: Some(current.id.clone()),
                rolled_to: None,
                leaked_at: None,
                leak_source: None,
                ..current.clone()
            };
            let mut previous = current.clone();
            previous.rolled_to = Some(key.id.clone());
            // A secret reported leaked gets no grace: whoever found it would keep it working.
            let leaked = current.leaked_at.is_some();
            let grace = if leaked { 0 } else { grace };
            if grace == 0 {
                previous.revoked = true;
                previous.revoked_at = Some(now);
                previous.revocation_reason = Some(if leaked {
                    format!(
                        "rolled: replaced by {} (its secret was reported leaked)",
                        key.id
                    )
                } else {
                    format!("rolled: replaced by {}", key.id)
                });
            } else {
                let grace_ends = UnixMillis(now.0.saturating_add(grace.saturating_mul(1000)));
                previous.expiration =
                    Some(current.expiration.map_or(grace_ends, |e| e.min(grace_ends)));
            }
            previous.updated_at = now;
            previous.revision = current.revision + 1;
            let audit = |key_id: &KeyId, details: Value| AuditEvent {
                at: now,
                actor: actor.to_owned(),
                action: if key_id == id { "roll" } else { "create" },
                key_id: Some(key_id.clone()),
                details,
            };
            let rolled = audit(
                id,
                json!({
                    "rolled_to": key.id,
                    "grace_period_seconds": grace,
                    "grace_period_requested": roll.grace_period_seconds,
                    "leaked": leaked,
                    "expiration": { "from": current.expiration, "to": previous.expiration },
                    "revoked": previous.revoked,
                }),
            );
            let created = audit(
                &key.id,
                json!({
                    "name": key.name,
                    "subject": key.subject,
                    "scopes": key.scopes,
                    "expiration": key.expiration,
                    "hint": key.hint,
                    "allowed_ips": key.allowed_ips,
                    "type": key.key_type,
                    "rolled_from": id,
                }),
            );
            if self
                .store
                .roll((&previous, current.revision, &rolled), (&key, &created))
                .await?
            {
                self.announce_commit();
                return Ok(Rolled {
                    previous: self.with_usage(previous),
                    key,
                    secret,
                });
            }
        }
        Err(ServiceError::Conflict)
    }

    /// Verifies a presented secret, optionally requiring scopes. A successful verification
    /// moves `last_used_at` (in memory, flushed in batches).
    pub async fn verify(
        &self,
        presented: &str,
        required: &[String],
        client_ip: Option<&str>,
    ) -> Result<Verification, ServiceError> {
        let required =
            parse_required(required).map_err(|e| invalid("required_scopes", e.to_string()))?;
        let client = latchkey_shared::ip::parse_client_field(client_ip)
            .map_err(|e| invalid("client_ip", e.to_string()))?;
        let secret = match parse_presented(presented) {
            Ok(secret) => secret,
            Err(verdict) => {
                return Ok(Verification {
                    verdict,
                    key: None,
                    record: None,
                });
            }
        };
        let key = self.store.find_by_hash(&secret.hash()).await?;
        let now = system_now();
        let record = key.as_ref().map(StoredKey::record);
        let verdict = decide(
            record.as_ref(),
            &DecisionContext::at(now)
                .requiring(&required)
                .from_address(client),
        );
        let key = key.map(|k| {
            // One trip to the tracker: the use just recorded, or the pending one.
            let pending = if verdict.is_valid() {
                Some(self.usage.touch(&k.id, now))
            } else {
                self.usage.pending(&k.id)
            };
            with_pending_use(k, pending)
        });
        Ok(Verification {
            verdict,
            key,
            record,
        })
    }

    /// Audit log entries after `after_seq`, optionally for one key.
    pub async fn audit_log(
        &self,
        key_id: Option<&KeyId>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, ServiceError> {
        if limit == 0 || limit > limits::LIST_LIMIT_MAX {
            return Err(invalid(
                "limit",
                format!("must be from 1 to {}", limits::LIST_LIMIT_MAX),
            ));
        }
        Ok(self.store.audit_log(key_id, after_seq, limit).await?)
    }

    /// Read-modify-write: `apply` edits a copy and returns the audit details; the write succeeds
    /// only if nobody changed the key since it was read (optimistic locking).
    async fn change(
        &self,
        actor: &str,
        id: &KeyId,
        action: &'static str,
        deleted: Deleted,
        mut apply: impl FnMut(&mut StoredKey, UnixMillis) -> Result<Option<Value>, ServiceError>,
    ) -> Result<StoredKey, ServiceError> {
        let _turn = self.take_turn(id).await;
        for _ in 0..8 {
            let current = match deleted {
                Deleted::NotFound => self.existing(id).await?,
                Deleted::Found => self.store.get(id).await?.ok_or(ServiceError::NotFound)?,
            };
            let now = system_now();
            let mut next = current.clone();
            let Some(details) = apply(&mut next, now)? else {
                // Nothing to change: the key as it is.
                return Ok(self.with_usage(current));
            };
            next.updated_at = now;
            next.revision = current.revision + 1;
            let event = AuditEvent {
                at: now,
                actor: actor.to_owned(),
                action,
                key_id: Some(id.clone()),
                details,
            };
            if self.store.replace(&next, current.revision, &event).await? {
                self.announce_commit();
                return Ok(self.with_usage(next));
            }
        }
        Err(ServiceError::Conflict)
    }

    /// In this process, changes to one key take turns; the revision check stays as the
    /// backstop for other processes sharing the database.
    async fn take_turn(&self, id: &KeyId) -> tokio::sync::MutexGuard<'_, ()> {
        let stripe = id.as_str().bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        self.change_locks[stripe % CHANGE_LOCK_STRIPES].lock().await
    }

    fn with_usage(&self, key: StoredKey) -> StoredKey {
        let pending = self.usage.pending(&key.id);
        with_pending_use(key, pending)
    }

    /// Parses requested scopes under the policy (catalogue, wildcards). A refusal is written to
    /// the audit log before it is returned, so attempts to escalate leave a trace.
    async fn grant(
        &self,
        actor: &str,
        key: Option<&KeyId>,
        requested: &[String],
    ) -> Result<latchkey_shared::ScopeSet, ServiceError> {
        let refusal = if requested.len() > limits::SCOPES_MAX {
            format!("at most {} scopes", limits::SCOPES_MAX)
        } else {
            match self.policy.parse_grants(requested) {
                Ok(granted) => return Ok(granted),
                Err(e) => e.to_string(),
            }
        };
        let event = AuditEvent {
            at: system_now(),
            actor: actor.to_owned(),
            action: if key.is_some() {
                "update_refused"
            } else {
                "create_refused"
            },
            key_id: key.cloned(),
            details: json!({
                "field": "scopes",
                "reason": refusal,
                // Scopes are not secrets; keep the entry bounded whatever was sent.
                "requested": requested
                    .iter()
                    .take(limits::SCOPES_MAX)
                    .map(|s| s.chars().take(limits::SCOPE_AUDIT_CHARS_MAX).collect::<String>())
                    .collect::<Vec<_>>(),
                "requested_count": requested.len(),
            }),
        };
        if let Err(error) = self.store.record_event(&event).await {
            // The caller still gets the refusal; the missing audit entry is an operator matter.
            tracing::error!(%error, "could not audit a refused scope grant");
        }
        Err(invalid("scopes", refusal))
    }
}

/// What [`KeyService::change`] makes of a deleted key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deleted {
    /// It does not exist (every call that names a key by id).
    NotFound,
    /// It is changed as any other (a leak found by its secret).
    Found,
}

/// `key` with its `last_used_at` moved up to a use not yet written (`usage.rs`), if later.
fn with_pending_use(mut key: StoredKey, pending: Option<UnixMillis>) -> StoredKey {
    key.last_used_at = key.last_used_at.max(pending);
    key
}

fn expiry(now: UnixMillis, lifetime: Lifetime) -> Result<Option<UnixMillis>, ServiceError> {
    match lifetime {
        Lifetime::Never => Ok(None),
        Lifetime::Millis(ms) => expires_at(now, ms).map(Some),
        Lifetime::At(at) => {
            if at <= now || at.0 - now.0 > limits::EXPIRATION_MAX_SECONDS * 1000 {
                return Err(invalid(
                    "expiration",
                    "must be in the future and at most ten years away",
                ));
            }
            Ok(Some(at))
        }
    }
}

/// `now` plus a lifetime of `ms` milliseconds: more than 0 and at most ten years (so the sum
/// cannot overflow for any `now` a clock gives).
fn expires_at(now: UnixMillis, ms: i64) -> Result<UnixMillis, ServiceError> {
    if !(1..=limits::EXPIRATION_MAX_SECONDS * 1000).contains(&ms) {
        return Err(invalid(
            "seconds_until_expiration",
            format!(
                "must be more than 0 and at most {} seconds (a key that never expires has none; \"never\" removes an expiry in an update or a roll)",
                limits::EXPIRATION_MAX_SECONDS
            ),
        ));
    }
    Ok(UnixMillis(now.0.saturating_add(ms)))
}

/// Clerk's key `type`: 3 to 25 characters, single-line text.
fn key_type(value: &str) -> Result<String, ServiceError> {
    let value = text("type", value, *limits::KEY_TYPE_LEN.end())?;
    if value.chars().count() < *limits::KEY_TYPE_LEN.start() {
        return Err(invalid(
            "type",
            format!(
                "must be {} to {} characters",
                limits::KEY_TYPE_LEN.start(),
                limits::KEY_TYPE_LEN.end()
            ),
        ));
    }
    Ok(value)
}

/// A required single-line text field (a name, a subject): trimmed, non-empty, bounded, and no
/// control character at all, not even a newline or a tab: a subject travels in a header and in
/// signed messages, where a line break could pass for a field boundary.
fn text(field: &'static str, value: &str, max: usize) -> Result<String, ServiceError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(
            field,
            "must not contain control characters (line breaks and tabs included)",
        ));
    }
    bounded(field, value, max)
}

/// An optional free-text field (a description, a reason): newlines and tabs are allowed.
fn optional_text(
    field: &'static str,
    value: Option<String>,
    max: usize,
) -> Result<Option<String>, ServiceError> {
    value.map(|v| bounded(field, v.trim(), max)).transpose()
}

fn bounded(field: &'static str, value: &str, max: usize) -> Result<String, ServiceError> {
    if value.chars().count() > max {
        return Err(invalid(field, format!("must be at most {max} characters")));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(value.to_owned())
}

/// Claims must be a JSON object (or null for none), small and shallow.
fn claims(value: Value) -> Result<Option<Map<String, Value>>, ServiceError> {
    let map = match value {
        Value::Null => return Ok(None),
        Value::Object(map) => map,
        _ => return Err(invalid("claims", "must be a JSON object")),
    };
    if depth(&Value::Object(map.clone())) > limits::CLAIMS_MAX_DEPTH {
        return Err(invalid(
            "claims",
            format!(
                "must be nested at most {} levels deep",
                limits::CLAIMS_MAX_DEPTH
            ),
        ));
    }
    // A NUL is text no database should be asked to keep (PostgreSQL's JSON refuses it), and no
    // claim needs one.
    if has_nul(&Value::Object(map.clone())) {
        return Err(invalid(
            "claims",
            "must not contain the NUL character (\\u0000) in a name or a string",
        ));
    }
    if serde_json::to_string(&map)
        .map(|s| s.len())
        .unwrap_or(usize::MAX)
        > limits::CLAIMS_MAX_BYTES
    {
        return Err(invalid(
            "claims",
            format!("must be at most {} bytes of JSON", limits::CLAIMS_MAX_BYTES),
        ));
    }
    Ok(Some(map))
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_fields_are_trimmed_bounded_and_printable() {
        assert_eq!(text("name", "  acme  ", 10).expect("valid"), "acme");
        assert!(text("name", "   ", 10).is_err());
        assert!(text("name", &"x".repeat(11), 10).is_err());
        assert!(text("name", "a\0b", 10).is_err());
        assert_eq!(
            text("name", "ünïcødé", 7).expect("chars, not bytes"),
            "ünïcødé"
        );
    }

    #[test]
    fn claims_must_be_a_small_shallow_object() {
        assert_eq!(claims(Value::Null).expect("null"), None);
        assert!(claims(json!({ "a\0": 1 })).is_err(), "NUL in a name");
        assert!(claims(json!({ "a": ["x\0"] })).is_err(), "NUL in a string");
        assert!(claims(json!({ "a": "é" })).is_ok());
        assert!(
            claims(json!({"partner_id": "acme"}))
                .expect("valid")
                .is_some()
        );
        assert!(claims(json!(["a"])).is_err());
        assert!(claims(json!("a")).is_err());
        assert!(claims(json!({"big": "x".repeat(limits::CLAIMS_MAX_BYTES)})).is_err());
        let mut deep = json!(1);
        for _ in 0..limits::CLAIMS_MAX_DEPTH {
            deep = json!({ "d": deep });
        }
        assert!(claims(deep.clone()).is_ok());
        assert!(claims(json!({ "d": deep })).is_err());
    }

    #[test]
    fn expiration_is_bounded() {
        let max = limits::EXPIRATION_MAX_SECONDS * 1000;
        assert_eq!(
            expires_at(UnixMillis(1000), 1000).expect("valid"),
            UnixMillis(2000)
        );
        assert_eq!(expires_at(UnixMillis(0), 1).expect("valid"), UnixMillis(1));
        assert_eq!(
            expires_at(UnixMillis(0), max).expect("valid"),
            UnixMillis(max)
        );
        for refused in [0, -5, max + 1, i64::MAX, i64::MIN] {
            assert!(expires_at(UnixMillis(0), refused).is_err(), "{refused}");
        }
    }
}
