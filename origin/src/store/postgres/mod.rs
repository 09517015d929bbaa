//! PostgreSQL storage, for origin on several machines: any number of replicas serve from one
//! database, with the same guarantees as SQLite's file.
//!
//! By concern: `keys` (how a key is written, the list's filters), `commit` (the write lock,
//! group commit, the outbox, the audit append), `open` (pools, migrations, durability, the
//! roles' leases); this file holds the store and its `KeyStore` implementation.
//!
//! Invariants across replicas:
//! * every write that appends to the audit log or numbers outbox rows holds one advisory lock
//!   for its transaction (`commit::lock_writes`): one chain, and outbox rows in commit order;
//! * each background role is played by the replica holding its session advisory lock
//!   (`open::PgStore::lease`), on a connection of its own: the lock ends with the process;
//! * usage merges by taking the later time (`GREATEST`), so reports from any replica, in any
//!   order, leave the latest use; a usage batch's MAC is refused by every replica once one has
//!   accepted it (a primary key).

mod commit;
mod keys;
mod open;

pub(crate) use commit::lock_writes;
use commit::*;
use keys::*;
use open::settings;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use latchkey_shared::{KeyHash, KeyId, UnixMillis};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{Connection, Postgres, QueryBuilder, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::audit_row::{
    AuditRow, NextEntry, audit_entry, check_newest, refuse_truncated, refuse_wiped,
};
use super::change::{
    self, Change, ChangeWriter, GROUP_MAX, Pending, Writes, apply, checkpoint, group_commit,
    unconfirmed,
};
use super::key_row::{
    CHANGEABLE_COLUMNS, KEY_COLUMNS, KeyRow, bind_stored, column_value, key_columns,
};
use super::{KeyStore, StoreError, lease};
use crate::audit::{self, Anchored, AuditChain};
use crate::model::{
    AuditEntry, AuditEvent, KeyPage, ListFilter, OutboxEntry, OutboxStats, PolicyQuery, Sink,
    StoredKey, VerifyEntry,
};

/// A PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgStore {
    /// Reads for requests (or, in the copy `for_background` makes, for the background roles).
    pool: PgPool,
    /// The background roles' own connections.
    background: PgPool,
    /// The group-commit task's connection.
    writer: PgPool,
    /// For the roles' lease connections (without the pools' session limits).
    options: PgConnectOptions,
    /// Key changes go to the group-commit task.
    changes: mpsc::Sender<Pending>,
    /// Whether the ledger sink is fed (see [`KeyStore::set_ledger_sink`]).
    ledger_sink: Arc<AtomicBool>,
}

/// `KeyId` from a stored id, or a corrupt-row error naming `what`.
fn key_id(id: &str, what: impl FnOnce() -> String) -> Result<KeyId, StoreError> {
    KeyId::parse(id).map_err(|e| StoreError::Corrupt {
        id: what(),
        problem: e.to_string(),
    })
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl PgStore {
    async fn commit(&self, change: Change) -> Result<bool, StoreError> {
        change::commit(&self.changes, change).await
    }

    async fn keys_where(&self, sql: &str, id: &str) -> Result<Option<StoredKey>, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(StoredKey::try_from).transpose()
    }
}

#[async_trait]
impl KeyStore for PgStore {
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
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1")
        });
        self.keys_where(&SQL, id.as_str()).await
    }

    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<StoredKey>, StoreError> {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE secret_hash = $1")
        });
        let row: Option<KeyRow> = sqlx::query_as(&SQL)
            .bind(hash.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await?;
        row.map(StoredKey::try_from).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<KeyPage, StoreError> {
        let (rows, total) = if filter.claims_equal.is_empty() {
            keys::page_and_count(&self.pool, filter).await?
        } else {
            keys::page_counted(&self.pool, filter).await?
        };
        Ok(KeyPage {
            keys: rows
                .into_iter()
                .map(StoredKey::try_from)
                .collect::<Result<_, _>>()?,
            total_count: count(total),
        })
    }

    async fn record_usage(&self, usage: &[(KeyId, UnixMillis)]) -> Result<(), StoreError> {
        // In id order, so two replicas flushing the same keys take their row locks in the same
        // order and never deadlock.
        let mut usage: Vec<(&str, i64)> =
            usage.iter().map(|(id, at)| (id.as_str(), at.0)).collect();
        usage.sort_unstable();
        let mut tx = self.pool.begin().await?;
        for (id, at) in usage {
            sqlx::query(
                "UPDATE api_keys SET last_used_at = GREATEST(COALESCE(last_used_at, 0), $1) \
                 WHERE id = $2",
            )
            .bind(at)
            .bind(id)
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
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM usage_batches_seen WHERE until < $1")
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO usage_batches_seen (mac, until) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(mac.as_slice())
        .bind(until.0)
        .execute(&mut *tx)
        .await?;
        let accepted = inserted.rows_affected() == 1;
        if accepted {
            sqlx::query(
                "INSERT INTO usage_reports (id, last_accepted_at) VALUES (1, $1) \
                 ON CONFLICT (id) DO UPDATE SET last_accepted_at = \
                 GREATEST(usage_reports.last_accepted_at, excluded.last_accepted_at)",
            )
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(accepted)
    }

    async fn last_usage_report(&self) -> Result<Option<UnixMillis>, StoreError> {
        let at: Option<i64> =
            sqlx::query_scalar("SELECT last_accepted_at FROM usage_reports WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?;
        Ok(at.map(UnixMillis))
    }

    async fn audit_log(
        &self,
        key_id: Option<&KeyId>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        // Two statements, not `($2 IS NULL OR key_id = $2)`: each keeps its own index (the
        // key's entries, or the log by `seq`) whatever plan the server caches.
        const COLUMNS: &str = "seq, at, actor, action, key_id, details, prev_hash, hash, chain";
        let rows: Vec<AuditRow> = match key_id {
            Some(id) => {
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM audit_log WHERE key_id = $1 AND seq > $2 \
                     ORDER BY seq LIMIT $3"
                ))
                .bind(id.as_str())
                .bind(after_seq)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
                ))
                .bind(after_seq)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.into_iter().map(audit_entry).collect()
    }

    async fn policy_candidates(
        &self,
        query: PolicyQuery,
        limit: u32,
    ) -> Result<Vec<StoredKey>, StoreError> {
        const ACTIVITY: &str = "GREATEST(COALESCE(k.last_used_at, 0), k.updated_at)";
        const LIVE: &str = "NOT k.revoked AND NOT k.disabled \
             AND (k.expiration IS NULL OR k.expiration > $1)";
        let warned = |since: &str| {
            format!(
                "SELECT 1 FROM audit_log a WHERE a.key_id = k.id AND a.action = 'stale_warning' \
                 AND a.at >= {since}"
            )
        };
        let columns = key_columns()
            .map(|c| format!("k.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let (sql, binds): (String, Vec<i64>) = match query {
            PolicyQuery::StaleUnwarned { idle_before, now } => (
                format!(
                    "SELECT {columns} FROM api_keys k WHERE {LIVE} AND {ACTIVITY} < $2 \
                     AND NOT EXISTS ({}) ORDER BY {ACTIVITY} LIMIT $3",
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
                    "SELECT {columns} FROM api_keys k WHERE {LIVE} AND {ACTIVITY} < $2 \
                     ORDER BY {ACTIVITY} LIMIT $3"
                ),
                vec![now.0, idle_before.0],
            ),
            PolicyQuery::StaleDue {
                idle_before,
                warned_before: Some(warned_before),
                now,
            } => (
                format!(
                    "SELECT {columns} FROM api_keys k WHERE {LIVE} AND {ACTIVITY} < $2 \
                     AND EXISTS ({} AND a.at <= $3) ORDER BY {ACTIVITY} LIMIT $4",
                    warned(ACTIVITY)
                ),
                vec![now.0, idle_before.0, warned_before.0],
            ),
            PolicyQuery::ExpiringUnwarned { now, until } => (
                format!(
                    "SELECT {columns} FROM api_keys k WHERE NOT k.revoked AND NOT k.disabled \
                     AND k.expiration > $1 AND k.expiration <= $2 \
                     AND NOT EXISTS (SELECT 1 FROM audit_log a \
                     WHERE a.key_id = k.id AND a.action = 'expiry_warning' \
                     AND (a.details::jsonb) -> 'expires_at' = to_jsonb(k.expiration)) \
                     ORDER BY k.expiration LIMIT $3"
                ),
                vec![now.0, until.0],
            ),
        };
        let rows: Vec<KeyRow> = binds
            .into_iter()
            .fold(sqlx::query_as::<_, KeyRow>(&sql), |q, b| q.bind(b))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(StoredKey::try_from).collect()
    }

    async fn webhook_cursor(&self, endpoint: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT after_seq FROM webhook_cursors WHERE endpoint = $1")
                .bind(endpoint)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn set_webhook_cursor(
        &self,
        endpoint: &str,
        after_seq: i64,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO webhook_cursors (endpoint, after_seq, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (endpoint) DO UPDATE SET after_seq = excluded.after_seq, \
             updated_at = excluded.updated_at",
        )
        .bind(endpoint)
        .bind(after_seq)
        .bind(now.0)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn init_webhook_cursor(&self, endpoint: &str, now: UnixMillis) -> Result<(), StoreError> {
        // Under the write lock: the newest entry is the newest that will ever commit before it.
        let mut tx = begin_write(&self.pool).await?;
        sqlx::query(
            "INSERT INTO webhook_cursors (endpoint, after_seq, updated_at) \
             SELECT $1, COALESCE(MAX(seq), 0), $2 FROM audit_log \
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
        let actions: Vec<&str> = actions.to_vec();
        let oldest: Option<i64> = sqlx::query_scalar(
            "SELECT at FROM audit_log WHERE seq > $1 AND action = ANY($2) ORDER BY seq LIMIT 1",
        )
        .bind(after_seq)
        .bind(&actions)
        .fetch_optional(&self.pool)
        .await?;
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT 1 FROM audit_log WHERE seq > $1 AND action = ANY($2) \
             ORDER BY seq LIMIT $3) AS matching",
        )
        .bind(after_seq)
        .bind(&actions)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_one(&self.pool)
        .await?;
        Ok((count(n), oldest.map(UnixMillis)))
    }

    async fn outbox_peek(&self, sink: Sink, limit: u32) -> Result<Vec<OutboxEntry>, StoreError> {
        let sql = format!(
            "SELECT seq, key_id FROM kv_outbox WHERE {} ORDER BY seq LIMIT $1",
            pending_column(sink)
        );
        let rows: Vec<(i64, String)> = sqlx::query_as(&sql)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|(seq, id)| {
                Ok(OutboxEntry {
                    seq,
                    key_id: key_id(&id, || format!("kv_outbox seq {seq}"))?,
                })
            })
            .collect()
    }

    async fn outbox_ack(&self, sink: Sink, published: &[OutboxEntry]) -> Result<(), StoreError> {
        if published.is_empty() {
            return Ok(());
        }
        // Without the ledger sink nobody else clears the ledger flag: KV's acknowledgement does.
        let clear = match (sink, self.ledger_sink.load(Ordering::Relaxed)) {
            (Sink::Kv, false) => "kv_pending = false, ledger_pending = false",
            (Sink::Kv, true) => "kv_pending = false",
            (Sink::Ledger, _) => "ledger_pending = false",
        };
        let update = format!("UPDATE kv_outbox SET {clear} WHERE key_id = $1 AND seq <= $2");
        // In key order: KV's and the ledger's acknowledgements (perhaps from two replicas) then
        // take the same rows' locks in the same order, and never deadlock.
        let mut published: Vec<&OutboxEntry> = published.iter().collect();
        published.sort_unstable_by(|a, b| a.key_id.as_str().cmp(b.key_id.as_str()));
        let mut tx = self.pool.begin().await?;
        for entry in published {
            sqlx::query(&update)
                .bind(entry.key_id.as_str())
                .bind(entry.seq)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "DELETE FROM kv_outbox WHERE key_id = $1 AND seq <= $2 \
                 AND NOT kv_pending AND NOT ledger_pending",
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
        // Up to `i64::MAX` for all: one statement, whose plan does not hinge on a NULL.
        let sql = format!(
            "SELECT COUNT(*), MIN(enqueued_at) FROM kv_outbox WHERE {} AND seq <= $1",
            pending_column(sink)
        );
        let (pending, oldest): (i64, Option<i64>) = sqlx::query_as(&sql)
            .bind(up_to_seq.unwrap_or(i64::MAX))
            .fetch_one(&self.pool)
            .await?;
        Ok(OutboxStats {
            pending: count(pending),
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
        let mut tx = begin_write(&self.pool).await?;
        let queued: Vec<(String, i64)> = sqlx::query_as(
            "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending, rebuild) \
             SELECT id, $1, true, false, true FROM api_keys WHERE id > $2 ORDER BY id LIMIT $3 \
             RETURNING key_id, seq",
        )
        .bind(now.0)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        // Rows are numbered in the SELECT's order: the highest number is the last id.
        let Some((last, newest)) = queued.iter().max_by_key(|(_, seq)| *seq) else {
            return Ok(None);
        };
        Ok(Some((key_id(last, || last.clone())?, *newest)))
    }

    async fn outbox_enqueue(&self, keys: &[KeyId], now: UnixMillis) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = keys.iter().map(KeyId::as_str).collect();
        let mut tx = begin_write(&self.pool).await?;
        // For the ledger too: an isolate that cached the stale KV value keeps it until a ledger
        // entry with a higher revision arrives. Repairs are few.
        sqlx::query(
            "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending) \
             SELECT id, $2, true, true FROM unnest($1::text[]) WITH ORDINALITY AS t(id, n) \
             ORDER BY n",
        )
        .bind(&ids)
        .bind(now.0)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn outbox_enqueue_changed_since(
        &self,
        since: UnixMillis,
        now: UnixMillis,
    ) -> Result<u64, StoreError> {
        let mut tx = begin_write(&self.pool).await?;
        // Keys still on their way to KV count as recent whatever their age, and refresh notes of
        // an earlier run (perhaps to another ledger) are forgotten.
        let queued = sqlx::query(
            "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending) \
             SELECT id, $1, false, true FROM api_keys \
             WHERE (updated_at >= $2 \
                    OR id IN (SELECT key_id FROM kv_outbox WHERE kv_pending AND NOT rebuild)) \
             AND id NOT IN (SELECT key_id FROM kv_outbox WHERE ledger_pending) \
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
        let mut tx = begin_write(&self.pool).await?;
        // Keys no longer waiting for KV need no refresh.
        sqlx::query(
            "DELETE FROM ledger_refresh WHERE key_id NOT IN \
             (SELECT key_id FROM kv_outbox WHERE kv_pending AND NOT rebuild)",
        )
        .execute(&mut *tx)
        .await?;
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT key_id FROM kv_outbox WHERE kv_pending AND NOT rebuild \
             AND key_id NOT IN (SELECT key_id FROM kv_outbox WHERE ledger_pending) \
             AND key_id NOT IN (SELECT key_id FROM ledger_refresh WHERE at > $1) \
             GROUP BY key_id HAVING MIN(enqueued_at) <= $1 ORDER BY MIN(seq)",
        )
        .bind(cutoff.0)
        .fetch_all(&mut *tx)
        .await?;
        for id in &stale {
            sqlx::query(
                "INSERT INTO kv_outbox (key_id, enqueued_at, kv_pending, ledger_pending) \
                 VALUES ($1, $2, false, true)",
            )
            .bind(id)
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO ledger_refresh (key_id, at) VALUES ($1, $2) \
                 ON CONFLICT (key_id) DO UPDATE SET at = excluded.at",
            )
            .bind(id)
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
        let mut tx = self.pool.begin().await?;
        for key in keys {
            sqlx::query(
                "INSERT INTO kv_verify (key_id, due_at) VALUES ($1, $2) ON CONFLICT (key_id) \
                 DO UPDATE SET due_at = GREATEST(kv_verify.due_at, excluded.due_at)",
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
            "SELECT key_id, due_at, attempts FROM kv_verify WHERE due_at <= $1 \
             ORDER BY due_at LIMIT $2",
        )
        .bind(now.0)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(id, due_at, attempts)| {
                Ok(VerifyEntry {
                    key_id: key_id(&id, || format!("kv_verify {id}"))?,
                    due_at: UnixMillis(due_at),
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                })
            })
            .collect()
    }

    async fn verify_done(&self, entry: &VerifyEntry) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM kv_verify WHERE key_id = $1 AND due_at = $2")
            .bind(entry.key_id.as_str())
            .bind(entry.due_at.0)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn verify_retry(
        &self,
        entry: &VerifyEntry,
        due_at: UnixMillis,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE kv_verify SET due_at = GREATEST(due_at, $1), attempts = attempts + 1 \
             WHERE key_id = $2",
        )
        .bind(due_at.0)
        .bind(entry.key_id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn verify_pending(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM kv_verify")
            .fetch_one(&self.pool)
            .await?;
        Ok(count(n))
    }

    async fn keys_after(
        &self,
        after: Option<&KeyId>,
        limit: u32,
    ) -> Result<Vec<StoredKey>, StoreError> {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id > $1 ORDER BY id LIMIT $2")
        });
        let rows: Vec<KeyRow> = sqlx::query_as(&SQL)
            .bind(after.map_or("", KeyId::as_str))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(StoredKey::try_from).collect()
    }

    async fn count_keys(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(count(n))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
        self.background.close().await;
    }

    async fn hold_lease(
        &self,
        role: lease::Role,
        stop: &mut tokio::sync::watch::Receiver<bool>,
        waiting: &str,
    ) -> Result<lease::Lease, lease::Stopped> {
        let mut announced = false;
        loop {
            match self.lease(role).await {
                Ok(Some(lease)) => return Ok(lease),
                Ok(None) if !announced => {
                    tracing::warn!(role = role.name(), "{waiting}");
                    announced = true;
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(%error, role = role.name(), "cannot take the lease; retrying");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return Err(lease::Stopped),
            }
        }
    }

    async fn try_lease(&self, role: lease::Role) -> Result<Option<lease::Lease>, StoreError> {
        self.lease(role).await
    }

    fn for_background(&self) -> Arc<dyn KeyStore> {
        Arc::new(self.background_copy())
    }

    async fn durability(&self) -> Result<String, StoreError> {
        let s = settings(&self.pool).await?;
        Ok(format!(
            "fsync={} synchronous_commit={}",
            s.fsync, s.synchronous_commit
        ))
    }

    async fn set_ledger_sink(&self, enabled: bool) -> Result<u64, StoreError> {
        self.ledger_sink.store(enabled, Ordering::Relaxed);
        if enabled {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        let released =
            sqlx::query("UPDATE kv_outbox SET ledger_pending = false WHERE ledger_pending")
                .execute(&mut *tx)
                .await?
                .rows_affected();
        sqlx::query("DELETE FROM kv_outbox WHERE NOT kv_pending AND NOT ledger_pending")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(released)
    }

    async fn keys_without_create(&self) -> Result<(u64, Option<String>), StoreError> {
        let (n, first): (i64, Option<String>) = sqlx::query_as(
            "SELECT COUNT(*), MIN(id) FROM api_keys k WHERE NOT EXISTS \
             (SELECT 1 FROM audit_log a WHERE a.key_id = k.id AND a.action = 'create')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((count(n), first))
    }

    async fn anchor_unkeyed(&self, _chain: &AuditChain) -> Result<Anchored, StoreError> {
        Err(StoreError::Audit(
            "a PostgreSQL database is only ever written with AUDIT_CHAIN_KEY: there is nothing \
             to anchor (anchor a SQLite database before `origin migrate-store` copies it)"
                .into(),
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests;
