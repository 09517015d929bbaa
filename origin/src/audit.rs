//! The audit log's chain: how an entry's hash is computed, the checkpoints that anchor the chain
//! outside the database, and how both are checked.
//!
//! **Chain version 2** (every entry written since `AUDIT_CHAIN_KEY` exists):
//! `hash = HMAC-SHA256(AUDIT_CHAIN_KEY, "latchkey-audit-v2\n" ‖ fields)` where `fields` is
//! `prev_hash ‖ seq ‖ at ‖ actor ‖ action ‖ key_id ‖ details`, each field length-prefixed so
//! that no two different entries encode to the same bytes. The key is never stored in the
//! database, so someone who can write the database but does not have the key cannot make an
//! entry whose hash verifies: editing, inserting, deleting or reordering any entry is detected.
//!
//! **Chain version 1** (entries written before the key existed): `hash = SHA-256(fields)`,
//! unkeyed. Anyone who can write the database can recompute it, so such entries prove only
//! what the first keyed entry after them vouches for: that they were there, as they are, when
//! they were anchored. Anchoring is the operator's explicit, one-time step (`origin audit
//! anchor` appends an `audit_chain_keyed` entry), never automatic: to origin, a chain that ends
//! with unkeyed entries looks the same whether it predates the key or was rewritten without it,
//! so `origin serve` refuses to start on one. An unkeyed entry after a keyed one is refused (a
//! rewrite without the key).
//!
//! **Keys the log does not account for.** Every key is created with a `create` entry, so
//! `origin audit verify` also refuses a database holding keys without one: a key inserted
//! behind origin's back, or a log wiped (with its checkpoints) and maybe written again.
//!
//! **Checkpoints.** A keyed chain still cannot show that its newest entries were deleted: what
//! is left is a valid chain. So after every commit that appended entries, origin appends a
//! checkpoint, `{"audit_checkpoint":1,"seq":…,"hash":…,"at":…,"mac":…}` (the newest entry's
//! sequence number and hash, MACed with the key), to a file outside the database
//! (`AUDIT_CHECKPOINT_FILE`) and logs the same line at `info`, so shipped logs anchor the chain
//! too. `origin audit verify` refuses a chain that ends before a checkpoint or differs from one.
//! The first entry's `prev_hash` is 64 zeros.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use latchkey_shared::sign::{self, SigningSecret};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::model::AuditEntry;

/// `prev_hash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Chain version of entries written before `AUDIT_CHAIN_KEY` existed: unkeyed SHA-256.
pub const CHAIN_UNKEYED: i64 = 1;

/// Chain version of entries MACed with `AUDIT_CHAIN_KEY`.
pub const CHAIN_KEYED: i64 = 2;

/// The audit action `origin audit anchor` appends onto unkeyed entries from before the key.
pub const ACTION_CHAIN_KEYED: &str = "audit_chain_keyed";

/// What an entry's hash covers, in either version.
#[derive(Debug, Clone, Copy)]
pub struct EntryFields<'a> {
    /// The previous entry's hash ([`GENESIS_HASH`] for the first).
    pub prev_hash: &'a str,
    /// Position in the chain, from 1.
    pub seq: i64,
    /// When (unix ms).
    pub at: i64,
    /// Who.
    pub actor: &'a str,
    /// What.
    pub action: &'a str,
    /// Which key.
    pub key_id: Option<&'a str>,
    /// The details' JSON, exactly as stored.
    pub details_json: &'a str,
}

impl<'a> EntryFields<'a> {
    /// The fields of a stored entry, chained onto `prev_hash`.
    pub fn of(e: &'a AuditEntry, prev_hash: &'a str) -> Self {
        Self {
            prev_hash,
            seq: e.seq,
            at: e.at,
            actor: &e.actor,
            action: &e.action,
            key_id: e.key_id.as_deref(),
            details_json: &e.details_json,
        }
    }

    /// Each field length-prefixed, so no two different entries encode to the same bytes.
    fn bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(128 + self.details_json.len());
        for field in [
            self.prev_hash.as_bytes(),
            &self.seq.to_be_bytes(),
            &self.at.to_be_bytes(),
            self.actor.as_bytes(),
            self.action.as_bytes(),
            self.key_id.unwrap_or("").as_bytes(),
            self.details_json.as_bytes(),
        ] {
            bytes.extend_from_slice(&(field.len() as u64).to_be_bytes());
            bytes.extend_from_slice(field);
        }
        bytes
    }
}

/// The hash of a version-1 (unkeyed) entry with these fields.
pub fn entry_hash(fields: &EntryFields<'_>) -> String {
    hex::encode(Sha256::digest(fields.bytes()))
}

/// The hash of a version-2 entry with these fields: HMAC-SHA256 keyed with `key`.
pub fn entry_mac(key: &SigningSecret, fields: &EntryFields<'_>) -> String {
    let mut message = b"latchkey-audit-v2\n".to_vec();
    message.extend(fields.bytes());
    sign::sign(key.as_bytes(), &message)
}

/// Whether two hex MACs are equal, compared in constant time.
pub fn same(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Where the chain first fails to hold.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// An entry's `prev_hash` is not the previous entry's hash (a row deleted or reordered).
    #[error(
        "audit entry {seq}: prev_hash does not match the previous entry's hash (an entry was deleted, inserted or reordered)"
    )]
    Broken {
        /// The first bad entry.
        seq: i64,
    },
    /// An entry's hash does not match its content (a row edited).
    #[error("audit entry {seq}: content does not match its {what} (edited{hint})")]
    Tampered {
        /// The first bad entry.
        seq: i64,
        /// `MAC` (keyed) or `hash` (unkeyed).
        what: &'static str,
        /// For a keyed entry: or another key.
        hint: &'static str,
    },
    /// Sequence numbers are not 1, 2, 3, …
    #[error(
        "audit entry {seq}: expected sequence number {expected} (an entry was deleted or inserted)"
    )]
    Gap {
        /// The entry found.
        seq: i64,
        /// The number expected.
        expected: i64,
    },
    /// An unkeyed entry after a keyed one: someone rewrote the chain without the key.
    #[error(
        "audit entry {seq}: an unkeyed entry after keyed ones (the chain was rewritten without the key)"
    )]
    Downgrade {
        /// The entry.
        seq: i64,
    },
    /// A chain version this build does not know.
    #[error("audit entry {seq}: unknown chain version {chain}")]
    UnknownVersion {
        /// The entry.
        seq: i64,
        /// Its version.
        chain: i64,
    },
    /// A keyed entry, and no key to check it with.
    #[error("audit entry {seq} is keyed: AUDIT_CHAIN_KEY is needed to check it")]
    NoKey {
        /// The entry.
        seq: i64,
    },
    /// An entry differs from the checkpoint taken when it was written.
    #[error(
        "audit entry {seq}: differs from the checkpoint taken when it was written (the chain was rewritten)"
    )]
    CheckpointMismatch {
        /// The entry.
        seq: i64,
    },
    /// The log ends before the newest checkpoint.
    #[error(
        "the log ends at entry {last} but a checkpoint vouches for entry {checkpoint}: the newest entries were deleted"
    )]
    Truncated {
        /// The newest entry in the database (0: none).
        last: i64,
        /// The newest checkpointed entry.
        checkpoint: i64,
    },
    /// Only unkeyed entries, and nothing that vouches for them.
    #[error(
        "all {entries} entries are unkeyed (written before AUDIT_CHAIN_KEY existed) and no keyed entry or checkpoint vouches for them: anyone who could write the database could have rewritten them; if this database was written before AUDIT_CHAIN_KEY existed, check them and run `origin audit anchor` once"
    )]
    Unanchored {
        /// How many.
        entries: u64,
    },
    /// Keyed entries, but no checkpoint.
    #[error(
        "no checkpoint vouches for the chain: a deletion of its newest entries could not be detected (check AUDIT_CHECKPOINT_FILE)"
    )]
    NoCheckpoint,
    /// No audit entries, yet keys: each was created with one, so the log was wiped.
    #[error(
        "the audit log is empty but the database holds {keys} keys, each created with an audit entry: the log was wiped"
    )]
    Wiped {
        /// How many keys.
        keys: u64,
    },
    /// Keys without a `create` entry in the log.
    #[error(
        "{keys} keys have no create entry in the audit log (the first: {example}): they were inserted behind origin's back, or the log was wiped and written again"
    )]
    Unaccounted {
        /// How many keys.
        keys: u64,
        /// The first of them.
        example: String,
    },
    /// A checkpoint line whose MAC does not verify.
    #[error(
        "checkpoint on line {line}: its MAC does not verify with AUDIT_CHAIN_KEY (forged, or another key)"
    )]
    ForgedCheckpoint {
        /// The line, from 1.
        line: usize,
    },
    /// Two valid checkpoints name different hashes for one entry.
    #[error(
        "two checkpoints disagree about entry {seq} (the log was restored from an older copy and written again?)"
    )]
    CheckpointConflict {
        /// The entry.
        seq: i64,
    },
}

/// One checkpoint: the newest entry of the chain when it was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointLine {
    audit_checkpoint: u32,
    seq: i64,
    hash: String,
    at: i64,
    mac: String,
}

const CHECKPOINT_MARK: &str = "{\"audit_checkpoint\":";

fn checkpoint_mac(key: &SigningSecret, seq: i64, hash: &str, at: i64) -> String {
    sign::sign(
        key.as_bytes(),
        format!("latchkey-audit-checkpoint-v1\n{seq}\n{hash}\n{at}").as_bytes(),
    )
}

/// The checkpoint line for the entry `seq` with `hash`, taken at `at` (unix ms).
pub fn checkpoint_line(key: &SigningSecret, seq: i64, hash: &str, at: i64) -> String {
    let line = CheckpointLine {
        audit_checkpoint: 1,
        seq,
        hash: hash.to_owned(),
        at,
        mac: checkpoint_mac(key, seq, hash, at),
    };
    serde_json::to_string(&line).unwrap_or_default()
}

/// Checkpoints read from a file or a log: each entry's hash by sequence number.
#[derive(Debug, Default)]
pub struct Checkpoints {
    by_seq: BTreeMap<i64, String>,
    /// Lines that held the checkpoint mark but did not parse (a write torn by a crash or a full
    /// disk). They vouch for nothing.
    pub unreadable: usize,
}

impl Checkpoints {
    /// Reads every checkpoint in `text`: lines of the checkpoint file, or log lines that carry
    /// one (everything before the mark is ignored). A checkpoint whose MAC does not verify is an
    /// error, not skipped.
    pub fn parse(key: &SigningSecret, text: &str) -> Result<Self, ChainError> {
        let mut found = Self::default();
        for (i, line) in text.lines().enumerate() {
            let Some(start) = line.find(CHECKPOINT_MARK) else {
                continue;
            };
            let Ok(cp) = serde_json::from_str::<CheckpointLine>(line[start..].trim_end()) else {
                found.unreadable += 1;
                continue;
            };
            if cp.audit_checkpoint != 1
                || !same(&cp.mac, &checkpoint_mac(key, cp.seq, &cp.hash, cp.at))
            {
                return Err(ChainError::ForgedCheckpoint { line: i + 1 });
            }
            match found.by_seq.get(&cp.seq) {
                Some(hash) if *hash != cp.hash => {
                    return Err(ChainError::CheckpointConflict { seq: cp.seq });
                }
                Some(_) => {}
                None => {
                    found.by_seq.insert(cp.seq, cp.hash);
                }
            }
        }
        Ok(found)
    }

    /// How many distinct entries are checkpointed.
    pub fn len(&self) -> usize {
        self.by_seq.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }

    /// The newest checkpointed entry.
    pub fn newest(&self) -> Option<i64> {
        self.by_seq.keys().next_back().copied()
    }
}

/// What a verified chain holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    /// Entries checked.
    pub entries: u64,
    /// Of which keyed (version 2).
    pub keyed: u64,
    /// Of which unkeyed (version 1, from before the key), all before the keyed ones.
    pub unkeyed: u64,
    /// The newest entry (0: none).
    pub last_seq: i64,
    /// The newest checkpointed entry, if any.
    pub newest_checkpoint: Option<i64>,
    /// The first keyed entry after unkeyed ones (the one that anchored them): its `seq`, `at`
    /// and action.
    pub anchor: Option<(i64, i64, String)>,
}

/// Checks a chain entry by entry, in `seq` order, so a long log never has to fit in memory.
#[derive(Debug)]
pub struct ChainChecker<'a> {
    key: Option<&'a SigningSecret>,
    checkpoints: &'a Checkpoints,
    prev_hash: String,
    last_seq: i64,
    keyed: u64,
    unkeyed: u64,
    anchor: Option<(i64, i64, String)>,
}

impl<'a> ChainChecker<'a> {
    /// A checker with `key` (needed for keyed entries) against `checkpoints`.
    pub fn new(key: Option<&'a SigningSecret>, checkpoints: &'a Checkpoints) -> Self {
        Self {
            key,
            checkpoints,
            prev_hash: GENESIS_HASH.to_owned(),
            last_seq: 0,
            keyed: 0,
            unkeyed: 0,
            anchor: None,
        }
    }

    /// Checks the next entry against the chain so far.
    pub fn check(&mut self, e: &AuditEntry) -> Result<(), ChainError> {
        let expected = self.last_seq.saturating_add(1);
        if e.seq != expected {
            return Err(ChainError::Gap {
                seq: e.seq,
                expected,
            });
        }
        if e.prev_hash != self.prev_hash {
            return Err(ChainError::Broken { seq: e.seq });
        }
        let fields = EntryFields::of(e, &self.prev_hash);
        match e.chain {
            CHAIN_UNKEYED => {
                if self.keyed > 0 {
                    return Err(ChainError::Downgrade { seq: e.seq });
                }
                let recomputed = entry_hash(&fields);
                if !same(&recomputed, &e.hash) {
                    return Err(ChainError::Tampered {
                        seq: e.seq,
                        what: "hash",
                        hint: "",
                    });
                }
                self.unkeyed += 1;
            }
            CHAIN_KEYED => {
                let key = self.key.ok_or(ChainError::NoKey { seq: e.seq })?;
                let recomputed = entry_mac(key, &fields);
                if !same(&recomputed, &e.hash) {
                    return Err(ChainError::Tampered {
                        seq: e.seq,
                        what: "MAC",
                        hint: ", or written with another AUDIT_CHAIN_KEY",
                    });
                }
                if self.keyed == 0 && self.unkeyed > 0 {
                    self.anchor = Some((e.seq, e.at, e.action.clone()));
                }
                self.keyed += 1;
            }
            chain => return Err(ChainError::UnknownVersion { seq: e.seq, chain }),
        }
        if let Some(hash) = self.checkpoints.by_seq.get(&e.seq)
            && !same(hash, &e.hash)
        {
            return Err(ChainError::CheckpointMismatch { seq: e.seq });
        }
        self.prev_hash.clone_from(&e.hash);
        self.last_seq = e.seq;
        Ok(())
    }

    /// Ends the check: the chain must reach the newest checkpoint, and something must vouch
    /// for it (a keyed entry and a checkpoint).
    pub fn finish(self) -> Result<ChainSummary, ChainError> {
        let newest_checkpoint = self.checkpoints.newest();
        if let Some(checkpoint) = newest_checkpoint
            && checkpoint > self.last_seq
        {
            return Err(ChainError::Truncated {
                last: self.last_seq,
                checkpoint,
            });
        }
        if self.keyed == 0 && self.unkeyed > 0 {
            return Err(ChainError::Unanchored {
                entries: self.unkeyed,
            });
        }
        if self.keyed > 0 && newest_checkpoint.is_none() {
            return Err(ChainError::NoCheckpoint);
        }
        Ok(ChainSummary {
            entries: self.keyed + self.unkeyed,
            keyed: self.keyed,
            unkeyed: self.unkeyed,
            last_seq: self.last_seq,
            newest_checkpoint,
            anchor: self.anchor,
        })
    }
}

/// What `origin audit anchor` anchored: unkeyed entries `1..=entries`, now vouched for by the
/// keyed entry `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchored {
    /// How many unkeyed entries (they are entries 1 to this).
    pub entries: i64,
    /// When the first and the newest of them were written (unix ms).
    pub written: (i64, i64),
    /// Their actions, and how many of each.
    pub actions: BTreeMap<String, u64>,
    /// The newest unkeyed entry's hash.
    pub hash: String,
    /// The keyed `audit_chain_keyed` entry appended onto them.
    pub seq: i64,
}

/// The audit chain's key and where its checkpoints go: what the store needs to append entries.
pub struct AuditChain {
    key: SigningSecret,
    checkpoints: Option<CheckpointFile>,
}

impl std::fmt::Debug for AuditChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditChain")
            .field("checkpoints", &self.checkpoints.as_ref().map(|c| &c.path))
            .finish_non_exhaustive()
    }
}

impl AuditChain {
    /// A chain keyed with `key`, checkpointed to `checkpoints` (`None`: only to the log).
    pub fn new(key: SigningSecret, checkpoints: Option<PathBuf>) -> Self {
        Self {
            key,
            checkpoints: checkpoints.map(|path| CheckpointFile {
                path,
                state: Mutex::new(WriterState::default()),
            }),
        }
    }

    /// The key.
    pub fn key(&self) -> &SigningSecret {
        &self.key
    }

    /// The checkpoint file, if there is one.
    pub fn checkpoint_path(&self) -> Option<&Path> {
        self.checkpoints.as_ref().map(|c| c.path.as_path())
    }

    /// The newest entry a valid checkpoint at the end of the checkpoint file vouches for (its
    /// last 64 KiB are read: hundreds of checkpoints). Unreadable and forged lines are skipped
    /// here; `origin audit verify` reports them.
    pub fn newest_checkpoint(&self) -> Option<i64> {
        use std::io::{Read as _, Seek as _, SeekFrom};
        const TAIL: u64 = 64 * 1024;
        let mut file = std::fs::File::open(&self.checkpoints.as_ref()?.path).ok()?;
        let len = file.metadata().ok()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(TAIL))).ok()?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail).ok()?;
        String::from_utf8_lossy(&tail)
            .lines()
            .filter_map(|line| {
                let start = line.find(CHECKPOINT_MARK)?;
                let cp: CheckpointLine = serde_json::from_str(line[start..].trim_end()).ok()?;
                (cp.audit_checkpoint == 1
                    && same(&cp.mac, &checkpoint_mac(&self.key, cp.seq, &cp.hash, cp.at)))
                .then_some(cp.seq)
            })
            .max()
    }

    /// Records a checkpoint for the entry `seq` with `hash`: a line appended to the checkpoint
    /// file and the same line logged at `info`. A failed write is logged and does not fail the
    /// commit it follows (that commit is on disk already); a later checkpoint covers it.
    pub fn checkpoint(&self, seq: i64, hash: &str, at: i64) {
        let line = checkpoint_line(&self.key, seq, hash, at);
        tracing::info!(checkpoint = %line, "audit checkpoint");
        if let Some(file) = &self.checkpoints
            && let Err(error) = file.append(&line)
        {
            tracing::error!(%error, file = %file.path.display(), "cannot write the audit checkpoint");
        }
    }
}

struct CheckpointFile {
    path: PathBuf,
    state: Mutex<WriterState>,
}

#[derive(Default)]
struct WriterState {
    file: Option<std::fs::File>,
    /// The last write failed, maybe half-way: start the next one on a line of its own.
    torn: bool,
}

impl CheckpointFile {
    fn append(&self, line: &str) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.file.is_none() {
            state.file = Some(open_private_append(&self.path)?);
        }
        let torn = state.torn;
        let Some(file) = state.file.as_mut() else {
            return Ok(());
        };
        let text = format!("{}{line}\n", if torn { "\n" } else { "" });
        // One write of the whole line on an O_APPEND file: lines never interleave. It reaches
        // the kernel before the commit's callers are answered (so it survives `kill -9`); it is
        // not fsynced (see README, Durability).
        let written = file.write_all(text.as_bytes());
        state.torn = written.is_err();
        if written.is_err() {
            // Reopen next time, in case the file was moved or its descriptor went bad.
            state.file = None;
        }
        written
    }
}

/// Where checkpoints go by default: beside the database, `<database>.audit-checkpoints`.
pub fn default_checkpoint_path(database: &Path) -> PathBuf {
    PathBuf::from(format!("{}.audit-checkpoints", database.display()))
}

/// Opens `path` for appending, creating it readable and writable by its owner alone (0600,
/// whatever the umask), and tightens an existing file to 0600.
pub fn open_private_append(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let file = options.open(path)?;
    make_private(path)?;
    Ok(file)
}

/// Sets `path` to mode 0600 (owner read and write only). A no-op off Unix.
pub fn make_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(path)?;
        if meta.permissions().mode() & 0o777 != 0o600 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> SigningSecret {
        SigningSecret::parse("0123456789abcdef0123456789abcdef").expect("key")
    }

    /// `n` entries, the first `unkeyed` of them version 1, the rest keyed with `key`.
    fn chain_of(n: i64, unkeyed: i64, key: &SigningSecret) -> Vec<AuditEntry> {
        let mut prev = GENESIS_HASH.to_owned();
        (1..=n)
            .map(|seq| {
                let details = json!({"n": seq});
                let args = (seq * 10, "admin:abc", "create", Some("key_x"));
                let chain = if seq <= unkeyed {
                    CHAIN_UNKEYED
                } else {
                    CHAIN_KEYED
                };
                let details_json = details.to_string();
                let fields = EntryFields {
                    prev_hash: &prev,
                    seq,
                    at: args.0,
                    actor: args.1,
                    action: args.2,
                    key_id: args.3,
                    details_json: &details_json,
                };
                let hash = if chain == CHAIN_UNKEYED {
                    entry_hash(&fields)
                } else {
                    entry_mac(key, &fields)
                };
                AuditEntry {
                    seq,
                    at: args.0,
                    actor: args.1.into(),
                    action: args.2.into(),
                    key_id: Some("key_x".into()),
                    details_json: details.to_string(),
                    details,
                    prev_hash: std::mem::replace(&mut prev, hash.clone()),
                    hash,
                    chain,
                }
            })
            .collect()
    }

    fn chain(n: i64) -> Vec<AuditEntry> {
        chain_of(n, 0, &key())
    }

    fn checkpoints_at(entries: &[AuditEntry], seqs: &[i64]) -> Checkpoints {
        let text: String = seqs
            .iter()
            .map(|&s| {
                let e = &entries[usize::try_from(s - 1).expect("seq")];
                format!("{}\n", checkpoint_line(&key(), e.seq, &e.hash, 1))
            })
            .collect();
        Checkpoints::parse(&key(), &text).expect("checkpoints")
    }

    fn verify(
        entries: &[AuditEntry],
        checkpoints: &Checkpoints,
    ) -> Result<ChainSummary, ChainError> {
        let key = key();
        let mut checker = ChainChecker::new(Some(&key), checkpoints);
        for e in entries {
            checker.check(e)?;
        }
        checker.finish()
    }

    #[test]
    fn an_intact_chain_verifies() {
        let entries = chain(5);
        let summary = verify(&entries, &checkpoints_at(&entries, &[2, 5])).expect("intact");
        assert_eq!(
            (summary.entries, summary.keyed, summary.last_seq),
            (5, 5, 5)
        );
        let none = Checkpoints::default();
        assert_eq!(verify(&[], &none).map(|s| s.entries), Ok(0));
    }

    #[test]
    fn edits_deletions_and_reorders_are_detected() {
        let entries = chain(5);
        let cps = checkpoints_at(&entries, &[5]);
        let mut edited = entries.clone();
        edited[2].actor = "someone-else".into();
        assert!(matches!(
            verify(&edited, &cps),
            Err(ChainError::Tampered { seq: 3, .. })
        ));

        let mut deleted = entries.clone();
        deleted.remove(2);
        assert_eq!(
            verify(&deleted, &cps),
            Err(ChainError::Gap {
                seq: 4,
                expected: 3
            })
        );

        let mut swapped = entries.clone();
        swapped.swap(1, 2);
        assert!(verify(&swapped, &cps).is_err());

        // The newest entry deleted: a valid chain, but shorter than the checkpoint.
        assert_eq!(
            verify(&entries[..4], &cps),
            Err(ChainError::Truncated {
                last: 4,
                checkpoint: 5
            })
        );

        // Rewritten from entry 2 on with unkeyed hashes: an unkeyed entry after a keyed one.
        let mut rewritten = entries.clone();
        let mut prev = rewritten[0].hash.clone();
        for e in &mut rewritten[1..] {
            e.chain = CHAIN_UNKEYED;
            e.prev_hash = prev.clone();
            e.hash = entry_hash(&EntryFields::of(e, &prev));
            prev = e.hash.clone();
        }
        assert_eq!(
            verify(&rewritten, &cps),
            Err(ChainError::Downgrade { seq: 2 })
        );

        // Rewritten whole as unkeyed: the checkpoint does not match.
        let forged = chain_of(5, 5, &key());
        assert!(matches!(
            verify(&forged, &cps),
            Err(ChainError::CheckpointMismatch { seq: 5 })
        ));
        // And without any checkpoint, nothing vouches for it.
        assert_eq!(
            verify(&forged, &Checkpoints::default()),
            Err(ChainError::Unanchored { entries: 5 })
        );
    }

    #[test]
    fn another_key_fails_and_no_checkpoint_is_an_error() {
        let other = SigningSecret::parse("fedcba9876543210fedcba9876543210").expect("key");
        let entries = chain_of(3, 0, &other);
        assert!(matches!(
            verify(&entries, &Checkpoints::default()),
            Err(ChainError::Tampered { seq: 1, .. })
        ));
        assert_eq!(
            verify(&chain(3), &Checkpoints::default()),
            Err(ChainError::NoCheckpoint)
        );
    }

    #[test]
    fn unkeyed_entries_before_keyed_ones_are_counted() {
        let entries = chain_of(5, 3, &key());
        let summary = verify(&entries, &checkpoints_at(&entries, &[5])).expect("anchored");
        assert_eq!((summary.unkeyed, summary.keyed), (3, 2));
        assert_eq!(summary.anchor, Some((4, 40, "create".into())));
        // An edit of an unkeyed entry, rechained, breaks the first keyed one.
        let mut edited = entries.clone();
        edited[0].actor = "x".into();
        let mut prev = GENESIS_HASH.to_owned();
        for e in &mut edited[..3] {
            e.prev_hash = prev.clone();
            e.hash = entry_hash(&EntryFields::of(e, &prev));
            prev = e.hash.clone();
        }
        assert_eq!(
            verify(&edited, &checkpoints_at(&entries, &[5])),
            Err(ChainError::Broken { seq: 4 })
        );
    }

    #[test]
    fn checkpoints_are_read_from_files_and_logs_and_forgeries_refused() {
        let entries = chain(2);
        let line = checkpoint_line(&key(), 2, &entries[1].hash, 7);
        let log = format!(
            "2026-01-01T00:00:00Z  INFO latchkey_origin::audit: audit checkpoint checkpoint={line}\n{{\"audit_checkpoint\":1,\"seq\":3\n"
        );
        let cps = Checkpoints::parse(&key(), &log).expect("parses");
        assert_eq!((cps.len(), cps.newest(), cps.unreadable), (1, Some(2), 1));
        let forged = line.replace("\"seq\":2", "\"seq\":9");
        assert_eq!(
            Checkpoints::parse(&key(), &forged).map(|c| c.len()),
            Err(ChainError::ForgedCheckpoint { line: 1 })
        );
    }
}
