//! SQLite storage: one writer connection (writes are serialised in process, so transactions never
//! fight over SQLite's lock) and a small pool of read-only connections (WAL lets them read while
//! the writer commits).
//!
//! By concern: `keys` (columns and rows), `open` (pools, durability), `commit` (write
//! transactions, group commit, the outbox), `chain` (the audit chain), `hot` (verify's reads);
//! this file holds the store and its `KeyStore` implementation.

mod chain;
mod commit;
mod hot;
mod keys;
mod open;

use chain::*;
use commit::*;
use hot::*;
use keys::*;
pub use open::Durability;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use latchkey_shared::{KeyHash, KeyId, UnixMillis};
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};
use tokio::sync::mpsc;

use super::audit_row::{
    AuditRow, NextEntry, VERIFY_HINT, audit_entry, check_newest, refuse_checkpointed,
    refuse_truncated, refuse_wiped, system_millis,
};
use super::change::{
    self, Change, ChangeWriter, GROUP_MAX, Pending, Writes, apply, checkpoint, group_commit,
    unconfirmed,
};
use super::key_row::{
    CHANGEABLE_COLUMNS, KEY_COLUMNS, KeyRow, bind_stored, column, column_value, key_columns,
};
use super::{KeyStore, StoreError, lease};
use crate::audit::{self, Anchored, AuditChain, ChainChecker, Checkpoints};
use crate::model::{
    AuditEntry, AuditEvent, KeyPage, ListFilter, OutboxEntry, OutboxStats, PolicyQuery, Sink,
    StoredKey, VerifyEntry,
};

/// A SQLite database file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    /// Reads for requests (or, in the copy [`SqliteStore::for_background`] makes, for the
    /// background roles).
    reader: SqlitePool,
    /// The background roles' own read connections: requests cannot take their turn.
    background: SqlitePool,
    file: Option<PathBuf>,
    /// Key changes go to the group-commit task.
    changes: mpsc::Sender<Pending>,
    /// Verify's lookup by hash (`None` for an in-memory database).
    hot: Option<Arc<HotReads>>,
    /// Write transactions this process has committed (see [`HotReads`]).
    commits: Arc<AtomicU64>,
    /// Whether the ledger sink is fed (see [`KeyStore::set_ledger_sink`]); shared by the
    /// background copy.
    ledger_sink: Arc<AtomicBool>,
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn record_event(&self, event: &AuditEvent) -> Result<(), StoreError> {
        self.commit(Change::Event(event.clone())).await.map(|_| ())
    }

    async fn insert(&self, key: &StoredKey, event: &AuditEvent) -> Result<(), StoreError> {
        self.commit(Change::Insert(key.clone(), event.clone()))
            .await
            .map(|_| ())
    }

    async fn replace(
        &self,
        key: &StoredKey,
        expected_revision: i64,
        event: &AuditEvent,
    ) -> Result<bool, StoreError> {
        self.commit(Change::Replace(
            key.clone(),
            expected_revision,
            event.clone(),
        ))
        .await
    }

    async fn roll(
        &self,
        old: (&StoredKey, i64, &AuditEvent),
        new: (&StoredKey, &AuditEvent),
    ) -> Result<bool, StoreError> {
        self.commit(Change::Roll {
            old: Box::new((old.0.clone(), old.1, old.2.clone())),
            new: Box::new((new.0.clone(), new.1.clone())),
        })
        .await
    }

    async fn get(&self, id: &KeyId) -> Result<Option<StoredKey>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?");
        let row: Option<KeyRow> = sqlx::query_as(&sql)
            .bind(id.as_str())
            .fetch_optional(&self.reader)
            .await?;
        row.map(StoredKey::try_from).transpose()
    }

    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<StoredKey>, StoreError> {
        if let Some(hot) = &self.hot {
            return hot.find_by_hash(hash);
        }
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE secret_hash = ?");
        let row: Option<KeyRow> = sqlx::query_as(&sql)
            .bind(hash.as_bytes().as_slice())
            .fetch_optional(&self.reader)
            .await?;
        row.map(StoredKey::try_from).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<KeyPage, StoreError> {
        let mut page = QueryBuilder::new(format!("SELECT {KEY_COLUMNS} FROM api_keys"));
        push_filter(&mut page, filter);
        page.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(i64::from(filter.limit))
            .push(" OFFSET ")
            .push_bind(i64::from(filter.offset));
        let rows: Vec<KeyRow> = page.build_query_as().fetch_all(&self.reader).await?;

        let mut count = QueryBuilder::new("SELECT COUNT(*) FROM api_keys");
        push_filter(&mut count, filter);
        let (total,): (i64,) = count.build_query_as().fetch_one(&self.reader).await?;

        Ok(KeyPage {
            keys: rows
                .into_iter()
                .map(StoredKey::try_from)
                .collect::<Result<_, _>>()?,
            total_count: u64::try_from(total).unwrap_or(0),
        })
    }

    async fn record_usage(&self, usage: &[(KeyId, UnixMillis)]) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        for (id, at) in usage {
            sqlx::query(
                "UPDATE api_keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE id = ?",
            )
            .bind(at.0)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn remember_usage_batch(
        &self,
        mac: &[u8; 32],
        until: UnixMillis,
        now: UnixMillis,
    ) -> Result<bool, StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        sqlx::query("DELETE FROM usage_batches_seen WHERE until < ?")
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
        let inserted =
            sqlx::query("INSERT OR IGNORE INTO usage_batches_seen (mac, until) VALUES (?, ?)")
                .bind(mac.as_slice())
                .bind(until.0)
                .execute(&mut *tx)
                .await?;
        let accepted = inserted.rows_affected() == 1;
        if accepted {
            sqlx::query(
                "INSERT INTO usage_reports (id, last_accepted_at) VALUES (1, ?) \
                 ON CONFLICT (id) DO UPDATE SET last_accepted_at = excluded.last_accepted_at",
            )
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(accepted)
    }

    async fn last_usage_report(&self) -> Result<Option<UnixMillis>, StoreError> {
        let at: Option<(i64,)> =
            sqlx::query_as("SELECT last_accepted_at FROM usage_reports WHERE id = 1")
                .fetch_optional(&self.reader)
                .await?;
        Ok(at.map(|(at,)| UnixMillis(at)))
    }

    async fn audit_log(
        &self,
        key_id: Option<&KeyId>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows: Vec<AuditRow> = sqlx::query_as(
            "SELECT seq, at, actor, action, key_id, details, prev_hash, hash, chain FROM audit_log \
             WHERE seq > ? AND (? IS NULL OR key_id = ?) ORDER BY seq LIMIT ?",
        )
        .bind(after_seq)
        .bind(key_id.map(KeyId::as_str))
        .bind(key_id.map(KeyId::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter().map(audit_entry).collect()
    }

    async fn policy_candidates(
        &self,
        query: PolicyQuery,
        limit: u32,
    ) -> Result<Vec<StoredKey>, StoreError> {
        const ACTIVITY: &str = "MAX(COALESCE(k.last_used_at, 0), k.updated_at)";
        const LIVE: &str =
            "k.revoked = 0 AND k.disabled = 0 AND (k.expiration IS NULL OR k.expiration > ?)";
        let warned = |since: &str| {
            format!(
                "SELECT 1 FROM audit_log a WHERE a.key_id = k.id AND a.action = 'stale_warning' \
                 AND a.at >= {since}"
            )
        };
        let columns = KEY_COLUMNS
            .split(',')
            .map(|c| format!("k.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let (sql, binds): (String, Vec<i64>) = match query {
            PolicyQuery::StaleUnwarned { idle_before, now } => (
                format!(
                    "SELECT {columns} FROM api_keys k WHERE {LIVE} AND {ACTIVITY} < ? \
                     AND NOT EXISTS ({}) ORDER BY {ACTIVITY} LIMIT ?",
                    warned(ACTIVITY)
                ),
                vec![now.0, idle_before.0],
            ),
            PolicyQuery::StaleDue {
                idle_before,
                warned_before: None,
                now,
            } => (
                format!(
                    "SELECT {columns} FROM api_keys k WHERE {LIVE} AND {ACTIVITY} < ? \
                     ORDER BY {ACTIVITY} LIMIT ?"
                ),
                vec![now.0, idle_before.0],
            ),
            PolicyQuery::StaleDue {
                idle_before,
                warned_before: Some(warned_before),
                now,
            } => (
                format!(
                    "SELECT {columns} FROM api_keys k WHERE {LIVE} AND {ACTIVITY} < ? \
                     AND EXISTS ({} AND a.at <= ?) ORDER BY {ACTIVITY} LIMIT ?",
                    warned(ACTIVITY)
                ),
                vec![now.0, idle_before.0, warned_before.0],
            ),
            PolicyQuery::ExpiringUnwarned { now, until } => (
                format!(
                    "SELECT {columns} FROM api_keys k WHERE k.revoked = 0 AND k.disabled = 0 \
                     AND k.expiration > ? \
                     AND k.expiration <= ? AND NOT EXISTS (SELECT 1 FROM audit_log a \
                     WHERE a.key_id = k.id AND a.action = 'expiry_warning' \
                     AND json_extract(a.details, '$.expires_at') = k.expiration) \
                     ORDER BY k.expiration LIMIT ?"
                ),
                vec![now.0, until.0],
            ),
        };
        let query = binds
            .into_iter()
            .fold(sqlx::query_as::<_, KeyRow>(&sql), |q, b| q.bind(b))
            .bind(i64::from(limit));
        let rows = query.fetch_all(&self.reader).await?;
        rows.into_iter().map(StoredKey::try_from).collect()
    }

    async fn webhook_cursor(&self, endpoint: &str) -> Result<Option<i64>, StoreError> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT after_seq FROM webhook_cursors WHERE endpoint = ?")
                .bind(endpoint)
                .fetch_optional(&self.reader)
                .await?;
        Ok(row.map(|(seq,)| seq))
    }

    async fn set_webhook_cursor(
        &self,
        endpoint: &str,
        after_seq: i64,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        sqlx::query(
            "INSERT INTO webhook_cursors (endpoint, after_seq, updated_at) VALUES (?, ?, ?) \
             ON CONFLICT (endpoint) DO UPDATE SET after_seq = excluded.after_seq, \
             updated_at = excluded.updated_at",
        )
        .bind(endpoint)
        .bind(after_seq)
        .bind(now.0)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn init_webhook_cursor(&self, endpoint: &str, now: UnixMillis) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        sqlx::query(
            "INSERT INTO webhook_cursors (endpoint, after_seq, updated_at) \
             SELECT ?, COALESCE(MAX(seq), 0), ? FROM audit_log WHERE 1 \
             ON CONFLICT (endpoint) DO NOTHING",
        )
        .bind(endpoint)
        .bind(now.0)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit_count(
        &self,
        after_seq: i64,
        actions: &[&str],
        max: u64,
    ) -> Result<(u64, Option<UnixMillis>), StoreError> {
        // Both walk the log from `after_seq` by its key: the first match, and at most `max`.
        let matching = |select: &str| {
            let mut query = QueryBuilder::<Sqlite>::new(select);
            query.push_bind(after_seq).push(" AND action IN (");
            let mut list = query.separated(", ");
            for action in actions {
                list.push_bind(*action);
            }
            query.push(") ORDER BY seq");
            query
        };
        let mut oldest = matching("SELECT at FROM audit_log WHERE seq > ");
        oldest.push(" LIMIT 1");
        let oldest: Option<(i64,)> = oldest.build_query_as().fetch_optional(&self.reader).await?;
        let mut count = matching("SELECT COUNT(*) FROM (SELECT 1 FROM audit_log WHERE seq > ");
        count
            .push(" LIMIT ")
            .push_bind(i64::try_from(max).unwrap_or(i64::MAX))
            .push(")");
        let (count,): (i64,) = count.build_query_as().fetch_one(&self.reader).await?;
        Ok((
            u64::try_from(count).unwrap_or(0),
            oldest.map(|(at,)| UnixMillis(at)),
        ))
    }

    async fn outbox_peek(&self, sink: Sink, limit: u32) -> Result<Vec<OutboxEntry>, StoreError> {
        let sql = format!(
            "SELECT seq, key_id FROM kv_outbox WHERE {} = 1 ORDER BY seq LIMIT ?",
            pending_column(sink)
        );
        let rows: Vec<(i64, String)> = sqlx::query_as(&sql)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter()
            .map(|(seq, key_id)| {
                let key_id = KeyId::parse(&key_id).map_err(|e| StoreError::Corrupt {
                    id: format!("kv_outbox seq {seq}"),
                    problem: e.to_string(),
                })?;
                Ok(OutboxEntry { seq, key_id })
            })
            .collect()
    }

    async fn outbox_ack(&self, sink: Sink, published: &[OutboxEntry]) -> Result<(), StoreError> {
        if published.is_empty() {
            return Ok(());
        }
        // Without the ledger sink nobody else clears the ledger flag: KV's acknowledgement does.
        let clear = match (sink, self.ledger_sink.load(Ordering::Relaxed)) {
            (Sink::Kv, false) => "kv_pending = 0, ledger_pending = 0",
            (Sink::Kv, true) => "kv_pending = 0",
            (Sink::Ledger, _) => "ledger_pending = 0",
        };
        let update = format!("UPDATE kv_outbox SET {clear} WHERE key_id = ? AND seq <= ?");
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        for entry in published {
            sqlx::query(&update)
                .bind(entry.key_id.as_str())
                .bind(entry.seq)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "DELETE FROM kv_outbox WHERE key_id = ? AND seq <= ? \
                 AND kv_pending = 0 AND ledger_pending = 0",
            )
            .bind(entry.key_id.as_str())
            .bind(entry.seq)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn outbox_stats(
        &self,
        sink: Sink,
        up_to_seq: Option<i64>,
    ) -> Result<OutboxStats, StoreError> {
        let sql = format!(
            "SELECT COUNT(*), MIN(enqueued_at) FROM kv_outbox WHERE {} = 1 AND (? IS NULL OR seq <= ?)",
            pending_column(sink)
        );
        let (pending, oldest): (i64, Option<i64>) = sqlx::query_as(&sql)
            .bind(up_to_seq)
            .bind(up_to_seq)
            .fetch_one(&self.reader)
            .await?;
        Ok(OutboxStats {
            pending: u64::try_from(pending).unwrap_or(0),
            oldest_enqueued_at: oldest.map(UnixMillis),
        })
    }

    async fn outbox_enqueue_all(
        &self,
        after: Option<&KeyId>,
        limit: u32,
        now: UnixMillis,
    ) -> Result<Option<(KeyId, i64)>, StoreError> {
        let after = after.map_or("", KeyId::as_str);
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        let last: Option<(String,)> = sqlx::query_as(
            "SELECT id FROM (SELECT id FROM api_keys WHERE id > ? ORDER BY id LIMIT ?) \
             ORDER BY id DESC LIMIT 1",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_optional(&mut *tx)
        .await?;
        let Some((last,)) = last else {
            tx.rollback().await?;
            return Ok(None);
        };
        let queued = sqlx::query(
            "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending, rebuild) \
             SELECT id, ?, 1, 0, 1 FROM api_keys WHERE id > ? AND id <= ? ORDER BY id",
        )
        .bind(now.0)
        .bind(after)
        .bind(&last)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let last = KeyId::parse(&last).map_err(|e| StoreError::Corrupt {
            id: last.clone(),
            problem: e.to_string(),
        })?;
        Ok(Some((last, queued.last_insert_rowid())))
    }

    async fn outbox_enqueue(&self, keys: &[KeyId], now: UnixMillis) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        for key in keys {
            // For the ledger too: an isolate that cached the stale KV value keeps it until a
            // ledger entry with a higher revision arrives. Repairs are few.
            sqlx::query(
                "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending) \
                 VALUES (?, ?, 1, 1)",
            )
            .bind(key.as_str())
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn outbox_enqueue_changed_since(
        &self,
        since: UnixMillis,
        now: UnixMillis,
    ) -> Result<u64, StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        // Keys still on their way to KV count as recent whatever their age, and refresh notes of
        // an earlier run (perhaps to another ledger) are forgotten.
        let queued = sqlx::query(
            "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending) \
             SELECT id, ?, 0, 1 FROM api_keys \
             WHERE (updated_at >= ? \
                    OR id IN (SELECT key_id FROM kv_outbox WHERE kv_pending = 1 AND rebuild = 0)) \
             AND id NOT IN (SELECT key_id FROM kv_outbox WHERE ledger_pending = 1) \
             ORDER BY updated_at",
        )
        .bind(now.0)
        .bind(since.0)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM ledger_refresh")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(queued.rows_affected())
    }

    async fn outbox_refresh_ledger(
        &self,
        cutoff: UnixMillis,
        now: UnixMillis,
    ) -> Result<u64, StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        // Keys no longer waiting for KV need no refresh.
        sqlx::query(
            "DELETE FROM ledger_refresh WHERE key_id NOT IN \
             (SELECT key_id FROM kv_outbox WHERE kv_pending = 1 AND rebuild = 0)",
        )
        .execute(&mut *tx)
        .await?;
        let stale: Vec<(String,)> = sqlx::query_as(
            "SELECT key_id FROM kv_outbox WHERE kv_pending = 1 AND rebuild = 0 \
             AND key_id NOT IN (SELECT key_id FROM kv_outbox WHERE ledger_pending = 1) \
             AND key_id NOT IN (SELECT key_id FROM ledger_refresh WHERE at > ?) \
             GROUP BY key_id HAVING MIN(enqueued_at) <= ? ORDER BY MIN(seq)",
        )
        .bind(cutoff.0)
        .bind(cutoff.0)
        .fetch_all(&mut *tx)
        .await?;
        for (key_id,) in &stale {
            sqlx::query(
                "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending) \
                 VALUES (?, ?, 0, 1)",
            )
            .bind(key_id)
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO ledger_refresh (key_id, at) VALUES (?, ?) \
                 ON CONFLICT (key_id) DO UPDATE SET at = excluded.at",
            )
            .bind(key_id)
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(u64::try_from(stale.len()).unwrap_or(u64::MAX))
    }

    async fn verify_schedule(&self, keys: &[KeyId], due_at: UnixMillis) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        for key in keys {
            sqlx::query(
                "INSERT INTO kv_verify (key_id, due_at) VALUES (?, ?) \
                 ON CONFLICT (key_id) DO UPDATE SET due_at = MAX(due_at, excluded.due_at)",
            )
            .bind(key.as_str())
            .bind(due_at.0)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn verify_due(
        &self,
        now: UnixMillis,
        limit: u32,
    ) -> Result<Vec<VerifyEntry>, StoreError> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT key_id, due_at, attempts FROM kv_verify WHERE due_at <= ? ORDER BY due_at LIMIT ?",
        )
        .bind(now.0)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter()
            .map(|(key_id, due_at, attempts)| {
                let key_id = KeyId::parse(&key_id).map_err(|e| StoreError::Corrupt {
                    id: format!("kv_verify {key_id}"),
                    problem: e.to_string(),
                })?;
                Ok(VerifyEntry {
                    key_id,
                    due_at: UnixMillis(due_at),
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                })
            })
            .collect()
    }

    async fn verify_done(&self, entry: &VerifyEntry) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        sqlx::query("DELETE FROM kv_verify WHERE key_id = ? AND due_at = ?")
            .bind(entry.key_id.as_str())
            .bind(entry.due_at.0)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn verify_retry(
        &self,
        entry: &VerifyEntry,
        due_at: UnixMillis,
    ) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.commits).await?;
        sqlx::query(
            "UPDATE kv_verify SET due_at = MAX(due_at, ?), attempts = attempts + 1 WHERE key_id = ?",
        )
        .bind(due_at.0)
        .bind(entry.key_id.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn verify_pending(&self) -> Result<u64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM kv_verify")
            .fetch_one(&self.reader)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn keys_after(
        &self,
        after: Option<&KeyId>,
        limit: u32,
    ) -> Result<Vec<StoredKey>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id > ? ORDER BY id LIMIT ?");
        let rows: Vec<KeyRow> = sqlx::query_as(&sql)
            .bind(after.map_or("", KeyId::as_str))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter().map(StoredKey::try_from).collect()
    }

    async fn count_keys(&self) -> Result<u64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.reader)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    async fn hold_lease(
        &self,
        role: lease::Role,
        stop: &mut tokio::sync::watch::Receiver<bool>,
        waiting: &str,
    ) -> Result<lease::Lease, lease::Stopped> {
        let path = lease::lock_path(self.file(), role);
        let held = lease::hold_lock(path.as_deref(), stop, waiting).await?;
        Ok(held.map_or_else(
            || lease::Lease::unshared(role),
            |file| lease::Lease::file(role, file),
        ))
    }

    async fn try_lease(&self, role: lease::Role) -> Result<Option<lease::Lease>, StoreError> {
        match lease::lock_path(self.file(), role) {
            None => Ok(Some(lease::Lease::unshared(role))),
            Some(path) => lease::try_lock(&path)
                .map(|held| held.map(|file| lease::Lease::file(role, file)))
                .map_err(|source| StoreError::Lease {
                    role: role.name(),
                    path: path.display().to_string(),
                    source,
                }),
        }
    }

    fn for_background(&self) -> Arc<dyn KeyStore> {
        Arc::new(self.background_copy())
    }

    async fn durability(&self) -> Result<String, StoreError> {
        let d = self.pragmas().await?;
        Ok(format!(
            "journal_mode={} synchronous={}",
            d.journal_mode,
            d.synchronous_name()
        ))
    }

    async fn set_ledger_sink(&self, enabled: bool) -> Result<u64, StoreError> {
        self.ledger_sink(enabled).await
    }

    async fn keys_without_create(&self) -> Result<(u64, Option<String>), StoreError> {
        self.unaccounted_keys().await
    }

    async fn anchor_unkeyed(&self, chain: &AuditChain) -> Result<Anchored, StoreError> {
        self.anchor(chain).await
    }
}

#[cfg(test)]
mod tests;
