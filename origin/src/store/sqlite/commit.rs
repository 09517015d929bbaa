//! Writes: one transaction at a time on the writer (`WriteTx`), key changes grouped into one
//! commit (`SqliteWriter`, run by `store::change::group_commit`), and the outbox rows each
//! change enqueues.

use super::*;

/// Announces a change of `id` to both sinks (KV and the ledger), inside the caller's
/// transaction.
pub(super) async fn enqueue_publish(
    conn: &mut SqliteConnection,
    id: &KeyId,
    at: UnixMillis,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending) VALUES (?, ?, 1, 1)",
    )
        .bind(id.as_str())
        .bind(at.0)
        .execute(&mut *conn)
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

/// One write transaction on the writer connection, begun and ended by hand rather than with
/// sqlx's `Transaction`.
///
/// After SQLITE_FULL or SQLITE_IOERR, SQLite may roll a transaction back by itself. sqlx's
/// transaction depth does not learn of it, so its next `begin()` on that connection issues a
/// SAVEPOINT inside a transaction that never commits: every later write is answered as
/// committed, seen by nobody else, and lost when the connection closes. (The disk-full test
/// found exactly that.) Here a transaction that did not end cleanly closes its connection, and
/// the next write starts on a fresh one.
///
/// Every commit is counted in `commits` before the caller goes on, which is what tells verify's
/// hot connections that their snapshot is out of date ([`HotReads`]).
pub(super) struct WriteTx {
    pub(super) conn: PoolConnection<Sqlite>,
    pub(super) commits: Arc<AtomicU64>,
    pub(super) ended: bool,
}

impl WriteTx {
    /// `BEGIN IMMEDIATE`: takes the write lock at once, so a busy database fails here, before
    /// any work, rather than at the first write.
    pub(super) async fn begin(
        pool: &SqlitePool,
        commits: &Arc<AtomicU64>,
    ) -> Result<Self, StoreError> {
        let mut conn = pool.acquire().await?;
        if let Err(error) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await {
            conn.close_on_drop();
            return Err(error.into());
        }
        Ok(Self {
            conn,
            commits: commits.clone(),
            ended: false,
        })
    }

    pub(super) async fn commit(mut self) -> Result<(), StoreError> {
        // Counted even if COMMIT fails: SQLite may have committed before reporting an error,
        // and a needless new snapshot costs only a few microseconds.
        let committed = sqlx::query("COMMIT").execute(&mut *self.conn).await;
        self.commits.fetch_add(1, Ordering::Release);
        committed?;
        self.ended = true;
        Ok(())
    }

    pub(super) async fn rollback(mut self) -> Result<(), StoreError> {
        sqlx::query("ROLLBACK").execute(&mut *self.conn).await?;
        self.ended = true;
        Ok(())
    }
}

impl std::ops::Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if !self.ended {
            // Its state is unknown: closing the connection rolls back whatever is open.
            self.conn.close_on_drop();
        }
    }
}

/// SQLite's writer: the one writer connection, the commit count verify's snapshots watch, the
/// chain's key.
pub(super) struct SqliteWriter {
    pub(super) pool: SqlitePool,
    pub(super) commits: Arc<AtomicU64>,
    pub(super) chain: Option<Arc<AuditChain>>,
}

#[async_trait]
impl ChangeWriter for SqliteWriter {
    async fn apply_together(&self, batch: &[Pending]) -> Result<Vec<bool>, StoreError> {
        let chain = self.chain.as_deref();
        let mut tx = WriteTx::begin(&self.pool, &self.commits).await?;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut newest = None;
        for pending in batch {
            outcomes.push(apply(&mut *tx, chain, &pending.change, &mut newest).await?);
        }
        tx.commit().await.map_err(unconfirmed)?;
        checkpoint(chain, newest);
        Ok(outcomes)
    }

    async fn apply_alone(&self, change: &Change) -> Result<bool, StoreError> {
        let chain = self.chain.as_deref();
        let mut tx = WriteTx::begin(&self.pool, &self.commits).await?;
        let mut newest = None;
        let outcome = apply(&mut *tx, chain, change, &mut newest).await?;
        tx.commit().await.map_err(unconfirmed)?;
        checkpoint(chain, newest);
        Ok(outcome)
    }
}

#[async_trait]
impl Writes for SqliteConnection {
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
