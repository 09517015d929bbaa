//! Key changes and group commit, whatever the backend: each change (with its audit entry and
//! outbox rows) is handed to one task, which commits every change waiting together, so a burst
//! of concurrent writes costs one sync to disk, not one each. Nobody is answered before the
//! commit that holds their change is durable.

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use latchkey_shared::{KeyId, UnixMillis};

use super::StoreError;
use crate::audit::AuditChain;
use crate::model::{AuditEvent, StoredKey};

/// A key change (with its audit entry and outbox row) waiting for the next group commit.
#[derive(Debug)]
pub(crate) enum Change {
    Insert(StoredKey, AuditEvent),
    /// The new state, the revision it replaces, the audit event.
    Replace(StoredKey, i64, AuditEvent),
    /// An entry that changes no key (a refused attempt, a policy's warning): the entry alone.
    Event(AuditEvent),
    /// A roll: the replaced key's new state, the revision it replaces and its audit event, then
    /// the new key and its own; both or neither.
    Roll {
        old: Box<(StoredKey, i64, AuditEvent)>,
        new: Box<(StoredKey, AuditEvent)>,
    },
}

/// A change and where its outcome goes.
pub(crate) struct Pending {
    pub(crate) change: Change,
    pub(crate) done: oneshot::Sender<Result<bool, StoreError>>,
}

/// Most changes committed together.
pub(crate) const GROUP_MAX: usize = 512;

/// How a backend writes changes: several in one transaction, or one alone. `false`: a
/// `Replace` (or a roll's) found another revision, and nothing of that change was written.
#[async_trait]
pub(crate) trait ChangeWriter: Send + Sync + 'static {
    async fn apply_together(&self, batch: &[Pending]) -> Result<Vec<bool>, StoreError>;
    async fn apply_alone(&self, change: &Change) -> Result<bool, StoreError>;
}

/// The group-commit task. It takes every change waiting when it starts a transaction (they
/// queued while the previous commit was syncing) and commits them together. If anything in a
/// batch fails, the batch is rolled back and each of its changes is retried in a transaction of
/// its own, so one bad change never fails the others and each caller gets its own outcome;
/// unless the database itself is unavailable, when every caller is answered so.
pub(crate) async fn group_commit(writer: impl ChangeWriter, mut queue: mpsc::Receiver<Pending>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < GROUP_MAX {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        match writer.apply_together(&batch).await {
            Ok(outcomes) => {
                for (pending, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = pending.done.send(Ok(outcome));
                }
            }
            // The database is unreachable (or full, or read-only): the batch's outcome may be
            // unknown (a lost answer to COMMIT), so nothing is written again; every caller is
            // told the store is unavailable, and retries.
            Err(error) if error.unavailable().is_some() => {
                let reason = error.unavailable().unwrap_or("the database failed");
                tracing::warn!(%error, changes = batch.len(), "group commit failed: the database is unavailable");
                for pending in batch {
                    let _ = pending.done.send(Err(StoreError::Unavailable(reason)));
                }
            }
            Err(error) => {
                tracing::debug!(%error, changes = batch.len(), "group commit failed; committing one by one");
                for pending in batch {
                    let outcome = writer.apply_alone(&pending.change).await;
                    let _ = pending.done.send(outcome);
                }
            }
        }
    }
}

/// A failed COMMIT: whether the database applied it is unknown, so it is never written again
/// (a retry could apply a change twice); the caller is answered that the store is unavailable,
/// with the reason when the failure says one.
pub(crate) fn unconfirmed(error: StoreError) -> StoreError {
    let reason = error
        .unavailable()
        .unwrap_or("the database did not confirm the commit");
    tracing::warn!(%error, "a commit was not confirmed: its outcome is unknown");
    StoreError::Unavailable(reason)
}

/// Hands `change` to the group-commit task behind `changes` and waits until it is durable.
pub(crate) async fn commit(
    changes: &mpsc::Sender<Pending>,
    change: Change,
) -> Result<bool, StoreError> {
    let (done, outcome) = oneshot::channel();
    changes
        .send(Pending { change, done })
        .await
        .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))?;
    outcome
        .await
        .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))?
}

/// The four writes a change is made of, inside a backend's write transaction.
#[async_trait]
pub(crate) trait Writes: Send {
    /// Inserts a whole key.
    async fn insert_key(&mut self, key: &StoredKey) -> Result<(), StoreError>;
    /// `false`: the key is not at `expected_revision` any more, and nothing was written.
    async fn update_key(
        &mut self,
        key: &StoredKey,
        expected_revision: i64,
    ) -> Result<bool, StoreError>;
    /// Appends `event` after `last`, the newest entry's `seq` and `hash`, MACed with the
    /// chain's key; returns the new entry's `seq`, `hash` and `at` (for the checkpoint after
    /// the commit).
    async fn append_audit(
        &mut self,
        chain: Option<&AuditChain>,
        event: &AuditEvent,
        last: Option<(i64, String)>,
    ) -> Result<(i64, String, i64), StoreError>;
    /// The newest entry's `seq` and `hash`; `None` for an empty log.
    async fn newest_entry(&mut self) -> Result<Option<(i64, String)>, StoreError>;
    /// Announces a change of `id` to both sinks (KV and the ledger).
    async fn enqueue_publish(&mut self, id: &KeyId, at: UnixMillis) -> Result<(), StoreError>;
}

/// Writes one change inside the caller's transaction. `false`: a `Replace` found another
/// revision, and nothing was written. The audit entry appended, if any, goes to `newest`, and
/// the next append of the same transaction chains onto it without reading the log again: so
/// `newest` starts as `None` with each transaction and never outlives it (after a rollback it
/// would name an entry that was never committed).
pub(crate) async fn apply(
    tx: &mut impl Writes,
    chain: Option<&AuditChain>,
    change: &Change,
    newest: &mut Option<(i64, String, i64)>,
) -> Result<bool, StoreError> {
    match change {
        Change::Insert(key, event) => {
            tx.insert_key(key).await?;
            append(tx, chain, event, newest).await?;
            tx.enqueue_publish(&key.id, key.updated_at).await?;
        }
        Change::Replace(key, expected_revision, event) => {
            if !tx.update_key(key, *expected_revision).await? {
                return Ok(false);
            }
            append(tx, chain, event, newest).await?;
            tx.enqueue_publish(&key.id, key.updated_at).await?;
        }
        Change::Roll { old, new } => {
            let (old_key, expected_revision, old_event) = old.as_ref();
            let (new_key, new_event) = new.as_ref();
            if !tx.update_key(old_key, *expected_revision).await? {
                return Ok(false);
            }
            tx.insert_key(new_key).await?;
            append(tx, chain, old_event, newest).await?;
            append(tx, chain, new_event, newest).await?;
            tx.enqueue_publish(&old_key.id, old_key.updated_at).await?;
            tx.enqueue_publish(&new_key.id, new_key.updated_at).await?;
        }
        Change::Event(event) => append(tx, chain, event, newest).await?,
    }
    Ok(true)
}

/// Appends `event` after the entry this transaction appended last (under the write lock it is
/// still the newest), or after the log's newest for the transaction's first; it becomes
/// `newest`.
async fn append(
    tx: &mut impl Writes,
    chain: Option<&AuditChain>,
    event: &AuditEvent,
    newest: &mut Option<(i64, String, i64)>,
) -> Result<(), StoreError> {
    let last = match newest.take() {
        Some((seq, hash, _)) => Some((seq, hash)),
        None => tx.newest_entry().await?,
    };
    *newest = Some(tx.append_audit(chain, event, last).await?);
    Ok(())
}

/// After a commit that appended audit entries, and before its callers are answered: a
/// checkpoint of the newest one, outside the database.
pub(crate) fn checkpoint(chain: Option<&AuditChain>, newest: Option<(i64, String, i64)>) {
    if let (Some(chain), Some((seq, hash, at))) = (chain, newest) {
        chain.checkpoint(seq, &hash, at);
    }
}
