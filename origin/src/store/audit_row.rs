//! The audit log's rows, whatever the backend: an entry read back, the checks a store makes
//! of its chain at start, and the next entry an append writes (its MAC over the previous one).

use latchkey_shared::KeyId;

use super::StoreError;
use crate::audit::{self, AuditChain};
use crate::model::{AuditEntry, AuditEvent};

/// At start with a key, once the newest entry is known to exist: it must verify with the key
/// (else the key changed, or the log was edited: refuse to write onto it). A chain that ends
/// with unkeyed entries is refused too: it predates the key (the operator anchors it once with
/// `origin audit anchor`) or was rewritten without the key, and origin cannot tell which, so
/// it never anchors one itself. Ends with a checkpoint of the newest entry.
pub(crate) fn check_newest(chain: &AuditChain, row: AuditRow) -> Result<(), StoreError> {
    let (seq, at, actor, action, key_id, details, prev_hash, hash, version) = row;
    match version {
        audit::CHAIN_KEYED => {
            let expected = audit::entry_mac(
                chain.key(),
                &audit::EntryFields {
                    prev_hash: &prev_hash,
                    seq,
                    at,
                    actor: &actor,
                    action: &action,
                    key_id: key_id.as_deref(),
                    details_json: &details,
                },
            );
            if !audit::same(&expected, &hash) {
                return Err(StoreError::Audit(format!(
                    "the newest audit entry ({seq}) does not verify with AUDIT_CHAIN_KEY: the key \
                     is not the one the log was written with, or the entry was edited; {VERIFY_HINT}"
                )));
            }
            chain.checkpoint(seq, &hash, at);
            Ok(())
        }
        audit::CHAIN_UNKEYED => {
            refuse_checkpointed(chain, seq)?;
            Err(StoreError::Audit(format!(
                "the newest audit entry ({seq}) is unkeyed, and origin never anchors unkeyed \
                 entries itself: if this database was written before AUDIT_CHAIN_KEY existed, run \
                 `origin audit anchor` once (same DATABASE_URL and AUDIT_CHAIN_KEY) and read what \
                 it anchors; if it ever ran with AUDIT_CHAIN_KEY, its log was rewritten without \
                 the key: do not anchor it, restore the database from a backup and {VERIFY_HINT}"
            )))
        }
        other => Err(StoreError::Audit(format!(
            "the newest audit entry ({seq}) has chain version {other}, unknown to this build"
        ))),
    }
}

/// An entry about to be appended after `last` (the newest entry's `seq` and `hash`, `None` for
/// an empty log), MACed with the chain's key.
pub(crate) struct NextEntry<'e> {
    pub(crate) seq: i64,
    pub(crate) prev_hash: String,
    pub(crate) hash: String,
    pub(crate) details: String,
    pub(crate) key_id: Option<&'e str>,
    pub(crate) event: &'e AuditEvent,
}

impl<'e> NextEntry<'e> {
    /// Refused without a chain key: such a store can read the log, never extend it.
    pub(crate) fn after(
        chain: Option<&AuditChain>,
        last: Option<(i64, String)>,
        event: &'e AuditEvent,
    ) -> Result<Self, StoreError> {
        let chain = chain.ok_or_else(|| {
            StoreError::Audit(
                "this store was opened without AUDIT_CHAIN_KEY and cannot append to the audit log"
                    .into(),
            )
        })?;
        let (prev_seq, prev_hash) = last.unwrap_or_else(|| (0, audit::GENESIS_HASH.to_owned()));
        let seq = prev_seq
            .checked_add(1)
            .ok_or_else(|| StoreError::Audit("the audit log is full (seq overflow)".into()))?;
        let details = event.details.to_string();
        let key_id = event.key_id.as_ref().map(KeyId::as_str);
        let hash = audit::entry_mac(
            chain.key(),
            &audit::EntryFields {
                prev_hash: &prev_hash,
                seq,
                at: event.at.0,
                actor: &event.actor,
                action: event.action,
                key_id,
                details_json: &details,
            },
        );
        Ok(Self {
            seq,
            prev_hash,
            hash,
            details,
            key_id,
            event,
        })
    }

    /// What the checkpoint after the commit needs: `seq`, `hash`, `at`.
    pub(crate) fn written(self) -> (i64, String, i64) {
        (self.seq, self.hash, self.event.at.0)
    }
}

pub(crate) const VERIFY_HINT: &str =
    "run `origin audit verify` (with the same DATABASE_URL and AUDIT_CHAIN_KEY)";

/// Refuses to start a chain over an empty log while `keys` exist: every key is created with an
/// audit entry, so keys without any entry mean a wiped log, and a fresh chain must not be
/// written over the wipe.
pub(crate) fn refuse_wiped(keys: i64) -> Result<(), StoreError> {
    if keys > 0 {
        return Err(StoreError::Audit(format!(
            "the audit log is empty but the database holds {keys} keys: the log was wiped; \
             restore the database from a backup and {VERIFY_HINT}"
        )));
    }
    Ok(())
}

/// Refuses a log that ends at `last`, before the newest checkpoint at the end of the
/// checkpoint file: its newest entries were deleted.
pub(crate) fn refuse_truncated(chain: &AuditChain, last: i64) -> Result<(), StoreError> {
    match chain.newest_checkpoint() {
        Some(checkpoint) if checkpoint > last => Err(StoreError::Audit(format!(
            "the audit log ends at entry {last}, but {} holds a checkpoint for entry \
             {checkpoint}: its newest entries were deleted (if the database was restored from an \
             older copy, archive the checkpoint file with the copy it belongs to); {VERIFY_HINT}",
            chain
                .checkpoint_path()
                .map_or_else(String::new, |p| p.display().to_string())
        ))),
        _ => Ok(()),
    }
}

/// Refuses unkeyed entries at the end of a chain that has checkpoints: they were taken from a
/// keyed chain, so it was rewritten without the key.
pub(crate) fn refuse_checkpointed(chain: &AuditChain, seq: i64) -> Result<(), StoreError> {
    match chain.checkpoint_path() {
        Some(path) if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) => {
            Err(StoreError::Audit(format!(
                "the newest audit entry ({seq}) is unkeyed, but {} holds checkpoints of a keyed \
                 chain: the log was rewritten without the key; {VERIFY_HINT}",
                path.display()
            )))
        }
        _ => Ok(()),
    }
}

pub(crate) fn system_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// An audit row: seq, at, actor, action, key_id, details, prev_hash, hash, chain.
pub(crate) type AuditRow = (
    i64,
    i64,
    String,
    String,
    Option<String>,
    String,
    String,
    String,
    i64,
);

pub(crate) fn audit_entry(row: AuditRow) -> Result<AuditEntry, StoreError> {
    let (seq, at, actor, action, key_id, details_json, prev_hash, hash, chain) = row;
    let details = serde_json::from_str(&details_json).map_err(|e| StoreError::Corrupt {
        id: format!("audit_log seq {seq}"),
        problem: e.to_string(),
    })?;
    Ok(AuditEntry {
        seq,
        at,
        actor,
        action,
        key_id,
        details,
        details_json,
        prev_hash,
        hash,
        chain,
    })
}
