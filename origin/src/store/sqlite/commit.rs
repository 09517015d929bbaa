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
            outcomes.push(apply(&mut tx, chain, &pending.change, &mut newest).await?);
        }
        tx.commit().await?;
        checkpoint(chain, newest);
        Ok(outcomes)
    }

    async fn apply_alone(&self, change: &Change) -> Result<bool, StoreError> {
        let chain = self.chain.as_deref();
        let mut tx = WriteTx::begin(&self.pool, &self.commits).await?;
        let mut newest = None;
        let outcome = apply(&mut tx, chain, change, &mut newest).await?;
        tx.commit().await?;
        checkpoint(chain, newest);
        Ok(outcome)
    }
}

/// After a commit that appended audit entries, and before its callers are answered: a
/// checkpoint of the newest one, outside the database.
pub(crate) fn checkpoint(chain: Option<&AuditChain>, newest: Option<(i64, String, i64)>) {
    if let (Some(chain), Some((seq, hash, at))) = (chain, newest) {
        chain.checkpoint(seq, &hash, at);
    }
}

/// Writes one change inside the caller's transaction. `false`: a `Replace` found another
/// revision, and nothing was written. The audit entry appended, if any, goes to `newest`.
pub(super) async fn apply(
    conn: &mut SqliteConnection,
    chain: Option<&AuditChain>,
    change: &Change,
    newest: &mut Option<(i64, String, i64)>,
) -> Result<bool, StoreError> {
    match change {
        Change::Insert(key, event) => {
            insert_key(conn, key).await?;
            *newest = Some(append_audit(conn, chain, event).await?);
            enqueue_publish(conn, &key.id, key.updated_at).await?;
        }
        Change::Replace(key, expected_revision, event) => {
            if !update_key(conn, key, *expected_revision).await? {
                return Ok(false);
            }
            *newest = Some(append_audit(conn, chain, event).await?);
            enqueue_publish(conn, &key.id, key.updated_at).await?;
        }
        Change::Roll { old, new } => {
            let (old_key, expected_revision, old_event) = old.as_ref();
            let (new_key, new_event) = new.as_ref();
            if !update_key(conn, old_key, *expected_revision).await? {
                return Ok(false);
            }
            insert_key(conn, new_key).await?;
            append_audit(conn, chain, old_event).await?;
            *newest = Some(append_audit(conn, chain, new_event).await?);
            enqueue_publish(conn, &old_key.id, old_key.updated_at).await?;
            enqueue_publish(conn, &new_key.id, new_key.updated_at).await?;
        }
        Change::Event(event) => *newest = Some(append_audit(conn, chain, event).await?),
    }
    Ok(true)
}
