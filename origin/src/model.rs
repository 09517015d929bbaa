//! The origin's view of a key: everything stored about it (never the secret).

use latchkey_shared::ip::IpAllowlist;
use latchkey_shared::{KeyHash, KeyId, KeyRecord, RECORD_VERSION, ScopeSet, UnixMillis};
use serde_json::{Map, Value};

/// A key as stored: its hash, hint and metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredKey {
    /// Public id.
    pub id: KeyId,
    /// SHA-256 of the secret.
    pub hash: KeyHash,
    /// Display hint: prefix and last four characters.
    pub hint: String,
    /// Human-readable name.
    pub name: String,
    /// Whom the key belongs to.
    pub subject: String,
    /// Free text.
    pub description: Option<String>,
    /// Granted scopes.
    pub scopes: ScopeSet,
    /// Caller-defined claims (the tutorial calls them `metadata`).
    pub claims: Option<Map<String, Value>>,
    /// Who asked for the key (free text from the caller).
    pub created_by: Option<String>,
    /// Expiry time, if any.
    pub expiration: Option<UnixMillis>,
    /// Whether revoked; final.
    pub revoked: bool,
    /// When revoked.
    pub revoked_at: Option<UnixMillis>,
    /// Why revoked.
    pub revocation_reason: Option<String>,
    /// Last successful verification, as last flushed (see `usage`).
    pub last_used_at: Option<UnixMillis>,
    /// Creation time.
    pub created_at: UnixMillis,
    /// Last change of state (not of usage).
    pub updated_at: UnixMillis,
    /// Increases with every change; guards concurrent updates.
    pub revision: i64,
    /// Switched off (reversibly) through update: verification answers `DISABLED`.
    pub disabled: bool,
    /// The only addresses the key may be used from (empty: anywhere).
    pub allowed_ips: IpAllowlist,
    /// The key this one replaced (see [`crate::service::KeyService::roll`]).
    pub rolled_from: Option<KeyId>,
    /// The key that replaced this one; set once, for good.
    pub rolled_to: Option<KeyId>,
    /// When the key was first reported as leaked (see [`crate::service::KeyService::report_leak`]).
    pub leaked_at: Option<UnixMillis>,
    /// Where it was found (a URL) or who reported it, as the first report said.
    pub leak_source: Option<String>,
    /// Clerk's key type: 3 to 25 characters, `api_key` unless the creator said otherwise.
    pub key_type: String,
    /// When the key was deleted: revoked then, and hidden since from every list and read by
    /// id (see [`crate::service::KeyService::delete`]); its row and audit entries stay.
    pub deleted_at: Option<UnixMillis>,
}

impl StoredKey {
    /// Whether the key is past its expiry at `now`.
    pub fn is_expired(&self, now: UnixMillis) -> bool {
        latchkey_shared::is_expired_at(self.expiration, now)
    }

    /// The record the verify decision (and the edge) sees.
    pub fn record(&self) -> KeyRecord {
        let mut record = KeyRecord {
            v: RECORD_VERSION,
            id: self.id.clone(),
            subject: self.subject.clone(),
            scopes: self.scopes.clone(),
            revoked: self.revoked,
            revoked_at: self.revoked_at,
            expires_at: self.expiration,
            revision: u64::try_from(self.revision).unwrap_or(0),
            disabled: self.disabled,
            allowed_ips: self.allowed_ips.clone(),
        };
        // The lowest version that says all of it, so edges of the previous release read every
        // record that needs nothing newer (`shared/src/record.rs`, "Versions").
        record.v = record.version_needed();
        record
    }
}

/// Which keys to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only keys of this subject.
    pub subject: Option<String>,
    /// Only revoked (`true`) or unrevoked (`false`) keys.
    pub revoked: Option<bool>,
    /// Only expired (`true`) or unexpired (`false`) keys, judged at `now`.
    pub expired: Option<bool>,
    /// Only keys never verified (`true`) or verified at least once (`false`).
    pub never_used: Option<bool>,
    /// Only keys last verified before this time (never-used keys excluded).
    pub last_used_before: Option<UnixMillis>,
    /// Only keys whose claim `.0` equals the string `.1`.
    pub claims_equal: Vec<(String, String)>,
    /// Only keys of this type (Clerk's `type`).
    pub key_type: Option<String>,
    /// Only keys whose name contains this text, ignoring ASCII case (Clerk's `query`).
    pub name_contains: Option<String>,
    /// The time that decides expiry.
    pub now: UnixMillis,
    /// Page size.
    pub limit: u32,
    /// Rows to skip.
    pub offset: u32,
}

/// One page of keys and the total matching the filter.
#[derive(Debug)]
pub struct KeyPage {
    /// The keys, newest first.
    pub keys: Vec<StoredKey>,
    /// How many keys match the filter in all.
    pub total_count: u64,
}

/// A change to append to the audit log, written in the same transaction as the change itself.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// When.
    pub at: UnixMillis,
    /// Who: the admin token's label.
    pub actor: String,
    /// What: `create`, `update` or `revoke`; or a refused attempt, `create_refused` or
    /// `update_refused`.
    pub action: &'static str,
    /// Which key (`None` for a refused create: no key exists).
    pub key_id: Option<KeyId>,
    /// What changed (JSON object, never a secret).
    pub details: Value,
}

/// One stored audit log entry.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditEntry {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// When (unix ms).
    pub at: i64,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// Which key.
    pub key_id: Option<String>,
    /// Details (JSON).
    pub details: Value,
    /// Details exactly as stored and hashed.
    #[serde(skip)]
    pub details_json: String,
    /// Hash of the previous entry (`0`×64 for the first).
    pub prev_hash: String,
    /// Hash of this entry: an HMAC keyed with `AUDIT_CHAIN_KEY` (chain version 2), or for
    /// entries from before the key, a SHA-256 (version 1; see `audit.rs`).
    pub hash: String,
    /// The chain version the hash was made with: 2 (`audit::CHAIN_KEYED`, an HMAC with
    /// `AUDIT_CHAIN_KEY`) or 1 (`CHAIN_UNKEYED`, from before the key). Served as `chain`.
    pub chain: i64,
}

/// Where the outbox delivers key changes. Each outbox row says which sinks still need it; a row
/// is deleted once no sink does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sink {
    /// Workers KV (`delivery::kv::publisher::Publisher`).
    Kv,
    /// The edge's change ledger (`delivery::ledger::LedgerPublisher`).
    Ledger,
}

impl Sink {
    /// The sink's name in logs and status.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kv => "kv",
            Self::Ledger => "ledger",
        }
    }
}

/// A pending publication: key `key_id` changed, as of outbox sequence number `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Position in the outbox; later changes have larger numbers.
    pub seq: i64,
    /// The key whose state must reach KV.
    pub key_id: KeyId,
}

/// The outbox's backlog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Rows waiting.
    pub pending: u64,
    /// When the oldest waiting change was made.
    pub oldest_enqueued_at: Option<UnixMillis>,
}

/// A key whose KV value must be read back at `due_at`: a write of it had an unknown outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyEntry {
    /// The key.
    pub key_id: KeyId,
    /// When to read its value back (unix ms).
    pub due_at: UnixMillis,
    /// Read-backs so far that found KV behind (or could not read it).
    pub attempts: u32,
}

/// Which keys a lifecycle policy acts on next (`jobs/policy.rs`). A key's activity is its last use
/// or its last change, whichever is later; a live key is neither revoked, disabled nor expired.
/// Each query leaves out the keys already dealt with, so a pass never stalls on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyQuery {
    /// Live keys inactive since before `idle_before` with no `stale_warning` since.
    StaleUnwarned {
        /// The activity cut-off.
        idle_before: UnixMillis,
        /// The time that decides expiry.
        now: UnixMillis,
    },
    /// Live keys inactive since before `idle_before` whose `stale_warning` (since their
    /// activity) was written no later than `warned_before`; `None`: no warning is needed.
    StaleDue {
        /// The activity cut-off.
        idle_before: UnixMillis,
        /// The latest warning that counts.
        warned_before: Option<UnixMillis>,
        /// The time that decides expiry.
        now: UnixMillis,
    },
    /// Keys neither revoked nor disabled expiring after `now` and no later than `until`, with
    /// no `expiry_warning` for their current expiry.
    ExpiringUnwarned {
        /// From.
        now: UnixMillis,
        /// To.
        until: UnixMillis,
    },
}
