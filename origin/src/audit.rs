//! The audit log's hash chain: how an entry's hash is computed and how the chain is checked.
//!
//! `hash = SHA-256(prev_hash ‖ seq ‖ at ‖ actor ‖ action ‖ key_id ‖ details)`, each field
//! length-prefixed so that no two different entries encode to the same bytes. The first entry's
//! `prev_hash` is 64 zeros. Rewriting, deleting or reordering any entry changes every hash after it.

use sha2::{Digest, Sha256};

use crate::model::AuditEntry;

/// `prev_hash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of an entry with these fields.
pub fn entry_hash(
    prev_hash: &str,
    seq: i64,
    at: i64,
    actor: &str,
    action: &str,
    key_id: Option<&str>,
    details_json: &str,
) -> String {
    let mut h = Sha256::new();
    for field in [
        prev_hash.as_bytes(),
        &seq.to_be_bytes(),
        &at.to_be_bytes(),
        actor.as_bytes(),
        action.as_bytes(),
        key_id.unwrap_or("").as_bytes(),
        details_json.as_bytes(),
    ] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field);
    }
    hex::encode(h.finalize())
}

/// Where the chain first fails to hold.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// An entry's `prev_hash` is not the previous entry's hash (a row deleted or reordered).
    #[error("audit entry {seq}: prev_hash does not match the previous entry's hash")]
    Broken {
        /// The first bad entry.
        seq: i64,
    },
    /// An entry's hash does not match its content (a row edited).
    #[error("audit entry {seq}: content does not match its hash")]
    Tampered {
        /// The first bad entry.
        seq: i64,
    },
    /// Sequence numbers are not 1, 2, 3, …
    #[error("audit entry {seq}: expected sequence number {expected}")]
    Gap {
        /// The entry found.
        seq: i64,
        /// The number expected.
        expected: i64,
    },
}

/// Checks a chain entry by entry, in `seq` order, so a long log never has to fit in memory.
#[derive(Debug)]
pub struct ChainChecker {
    prev_hash: String,
    checked: u64,
}

impl Default for ChainChecker {
    fn default() -> Self {
        Self {
            prev_hash: GENESIS_HASH.to_owned(),
            checked: 0,
        }
    }
}

impl ChainChecker {
    /// Checks the next entry against the chain so far.
    pub fn check(&mut self, e: &AuditEntry) -> Result<(), ChainError> {
        let expected = i64::try_from(self.checked).unwrap_or(i64::MAX) + 1;
        if e.seq != expected {
            return Err(ChainError::Gap {
                seq: e.seq,
                expected,
            });
        }
        if e.prev_hash != self.prev_hash {
            return Err(ChainError::Broken { seq: e.seq });
        }
        let recomputed = entry_hash(
            &self.prev_hash,
            e.seq,
            e.at,
            &e.actor,
            &e.action,
            e.key_id.as_deref(),
            &e.details_json,
        );
        if recomputed != e.hash {
            return Err(ChainError::Tampered { seq: e.seq });
        }
        self.prev_hash.clone_from(&e.hash);
        self.checked += 1;
        Ok(())
    }

    /// How many entries have been checked.
    pub fn checked(&self) -> u64 {
        self.checked
    }
}

/// Checks a whole chain, entries in `seq` order. Returns the number of entries checked.
pub fn verify_chain<'a>(
    entries: impl IntoIterator<Item = &'a AuditEntry>,
) -> Result<u64, ChainError> {
    let mut checker = ChainChecker::default();
    for e in entries {
        checker.check(e)?;
    }
    Ok(checker.checked())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain(n: i64) -> Vec<AuditEntry> {
        let mut prev = GENESIS_HASH.to_owned();
        (1..=n)
            .map(|seq| {
                let details = json!({"n": seq});
                let hash = entry_hash(
                    &prev,
                    seq,
                    seq * 10,
                    "admin:abc",
                    "create",
                    Some("key_x"),
                    &details.to_string(),
                );
                AuditEntry {
                    seq,
                    at: seq * 10,
                    actor: "admin:abc".into(),
                    action: "create".into(),
                    key_id: Some("key_x".into()),
                    details_json: details.to_string(),
                    details,
                    prev_hash: std::mem::replace(&mut prev, hash.clone()),
                    hash,
                }
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(verify_chain(&chain(5)), Ok(5));
        assert_eq!(verify_chain(&[]), Ok(0));
    }

    #[test]
    fn edits_deletions_and_reorders_are_detected() {
        let mut edited = chain(5);
        edited[2].actor = "someone-else".into();
        let mut edited_details = chain(5);
        edited_details[3].details_json = r#"{"n":5}"#.into();
        assert_eq!(
            verify_chain(&edited_details),
            Err(ChainError::Tampered { seq: 4 })
        );
        assert_eq!(verify_chain(&edited), Err(ChainError::Tampered { seq: 3 }));

        let mut deleted = chain(5);
        deleted.remove(2);
        assert_eq!(
            verify_chain(&deleted),
            Err(ChainError::Gap {
                seq: 4,
                expected: 3
            })
        );

        let mut swapped = chain(5);
        swapped.swap(1, 2);
        assert!(verify_chain(&swapped).is_err());

        let mut rehashed = chain(5);
        rehashed[1].details_json = r#"{"n":99}"#.into();
        rehashed[1].hash = entry_hash(
            &rehashed[1].prev_hash.clone(),
            2,
            20,
            "admin:abc",
            "create",
            Some("key_x"),
            r#"{"n":99}"#,
        );
        assert_eq!(verify_chain(&rehashed), Err(ChainError::Broken { seq: 3 }));
    }
}
