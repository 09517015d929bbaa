//! Key changes and group commit, whatever the backend: each change (with its audit entry and
//! outbox rows) is handed to one task, which commits every change waiting together, so a burst
//! of concurrent writes costs one sync to disk, not one each. Nobody is answered before the
//! commit that holds their change is durable.

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::StoreError;
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
/// its own, so one bad change never fails the others and each caller gets its own outcome.
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
