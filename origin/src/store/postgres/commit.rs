//! Writes: key changes grouped into one transaction (`PgWriter`, run by
//! `store::change::group_commit`), each under the write lock, with their audit entries and
//! outbox rows.
//!
//! Every transaction that appends to the audit log or numbers outbox rows first takes one
//! transaction-level advisory lock ([`lock_writes`]), whichever replica it runs on. So the
//! chain is extended one entry at a time (a transaction's first append reads the newest entry,
//! and each writes the next),
//! and outbox rows are numbered in commit order: a sink that read up to row `n` has seen every
//! row below `n` that will ever commit, which is what a ledger watermark promises.

use super::*;

/// The advisory lock space of Latchkey's locks (`pg_advisory_xact_lock(LOCKS, what)`): the
/// two-number keys never meet the one-number keys of sqlx's migration lock.
pub(super) const LOCKS: i32 = 0x4c4b_4559;
/// The write lock's number in [`LOCKS`]; the roles' leases use 1 and up.
const WRITES: i32 = 0;

/// Takes the write lock for the rest of the caller's transaction.
pub(crate) async fn lock_writes(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(LOCKS)
        .bind(WRITES)
        .execute(conn)
        .await?;
    Ok(())
}

/// Begins a transaction on `pool` holding the write lock.
pub(super) async fn begin_write(
    pool: &PgPool,
) -> Result<Transaction<'static, Postgres>, StoreError> {
    let mut tx = pool.begin().await?;
    lock_writes(&mut tx).await?;
    Ok(tx)
}

/// Announces a change of `id` to both sinks (KV and the ledger), inside the caller's
/// transaction (which holds the write lock).
pub(super) async fn enqueue_publish(
    conn: &mut PgConnection,
    id: &KeyId,
    at: UnixMillis,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending) \
         VALUES ($1, $2, true, true)",
    )
    .bind(id.as_str())
    .bind(at.0)
    .execute(conn)
    .await?;
    Ok(())
}

/// The outbox column that says `sink` still needs a row.
pub(super) fn pending_column(sink: Sink) -> &'static str {
    match sink {
        Sink::Kv => "kv_pending",
        Sink::Ledger => "ledger_pending",
    }
}

/// PostgreSQL's writer: connections of its own, and the chain's key.
pub(super) struct PgWriter {
    pub(super) pool: PgPool,
    pub(super) chain: Option<Arc<AuditChain>>,
}

#[async_trait]
impl ChangeWriter for PgWriter {
    async fn apply_together(&self, batch: &[Pending]) -> Result<Vec<bool>, StoreError> {
        let chain = self.chain.as_deref();
        let mut tx = begin_write(&self.pool).await?;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut newest = None;
        for pending in batch {
            outcomes.push(apply(&mut *tx, chain, &pending.change, &mut newest).await?);
        }
        tx.commit().await.map_err(|e| unconfirmed(e.into()))?;
        checkpoint(chain, newest);
        Ok(outcomes)
    }

    async fn apply_alone(&self, change: &Change) -> Result<bool, StoreError> {
        let chain = self.chain.as_deref();
        let mut tx = begin_write(&self.pool).await?;
        let mut newest = None;
        let outcome = apply(&mut *tx, chain, change, &mut newest).await?;
        tx.commit().await.map_err(|e| unconfirmed(e.into()))?;
        checkpoint(chain, newest);
        Ok(outcome)
    }
}

#[async_trait]
impl Writes for PgConnection {
    async fn insert_key(&mut self, key: &StoredKey) -> Result<(), StoreError> {
        insert_key(self, key).await
    }

    async fn update_key(
        &mut self,
        key: &StoredKey,
        expected_revision: i64,
    ) -> Result<bool, StoreError> {
        update_key(self, key, expected_revision).await
    }

    async fn append_audit(
        &mut self,
        chain: Option<&AuditChain>,
        event: &AuditEvent,
        last: Option<(i64, String)>,
    ) -> Result<(i64, String, i64), StoreError> {
        append_audit(self, chain, event, last).await
    }

    async fn newest_entry(&mut self) -> Result<Option<(i64, String)>, StoreError> {
        newest_entry(self).await
    }

    async fn enqueue_publish(&mut self, id: &KeyId, at: UnixMillis) -> Result<(), StoreError> {
        enqueue_publish(self, id, at).await
    }
}

/// The newest audit entry's `seq` and `hash`, read inside the caller's transaction; `None` for
/// an empty log.
pub(super) async fn newest_entry(
    conn: &mut PgConnection,
) -> Result<Option<(i64, String)>, StoreError> {
    Ok(
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(conn)
            .await?,
    )
}

/// Appends `event` after the newest entry, inside the caller's transaction (which holds the
/// write lock, so no other replica appends meanwhile; `seq` and `prev_hash` being unique would
/// refuse a fork anyway). Returns the new entry's `seq`, `hash` and `at`. `last`: the newest
/// entry's `seq` and `hash` ([`newest_entry`], or the one the same transaction appended).
pub(super) async fn append_audit(
    conn: &mut PgConnection,
    chain: Option<&AuditChain>,
    event: &AuditEvent,
    last: Option<(i64, String)>,
) -> Result<(i64, String, i64), StoreError> {
    let entry = NextEntry::after(chain, last, event)?;
    sqlx::query(
        "INSERT INTO audit_log (seq, at, actor, action, key_id, details, prev_hash, hash, chain) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(entry.seq)
    .bind(event.at.0)
    .bind(&event.actor)
    .bind(event.action)
    .bind(entry.key_id)
    .bind(&entry.details)
    .bind(&entry.prev_hash)
    .bind(&entry.hash)
    .bind(audit::CHAIN_KEYED)
    .execute(conn)
    .await?;
    Ok(entry.written())
}
