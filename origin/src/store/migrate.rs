//! `origin migrate-store`: copies a SQLite database into an empty PostgreSQL one, for teams
//! moving from the default to several replicas. Everything is copied as it is: keys, the audit
//! log (the same entries, so the same chain and the same checkpoints), the outbox's pending
//! deliveries in their order, KV read-backs, webhook cursors, and usage's replay guards.
//!
//! The source is read in one snapshot and the target written in one transaction, under the
//! target's write lock: a copy is whole or absent. Origins writing to the source meanwhile
//! would be lost to the copy, so every origin is stopped first (README, "Moving to
//! PostgreSQL").

use std::str::FromStr;

use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePoolOptions};
use sqlx::{Postgres, QueryBuilder, Sqlite, Transaction};

use super::audit_row::AuditRow;
use super::key_row::{KEY_COLUMNS, KeyRow, bind_stored, column_value, key_columns};
use super::{KeyStore, PgStore, SqliteStore, StoreError, postgres};
use crate::audit;
use crate::model::StoredKey;

/// Rows read from the source at a time.
const PAGE: i64 = 1000;

/// What a copy moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// Keys.
    pub keys: u64,
    /// Audit entries.
    pub audit_entries: u64,
    /// The newest entry's `seq` and `hash` (the chain's end, as in the source).
    pub newest: Option<(i64, String)>,
    /// Outbox rows still waiting for a sink.
    pub outbox_rows: u64,
    /// The smaller tables' rows: KV read-backs, ledger refresh notes, webhook cursors, usage
    /// reports and accepted usage batches.
    pub other_rows: u64,
}

/// Copies the SQLite database `from` into the PostgreSQL database `to`, which must hold no key
/// and no audit entry (its schema is made if missing).
pub async fn sqlite_to_postgres(from: &str, to: &str) -> Result<Copied, StoreError> {
    if !from.starts_with("sqlite:") || from.contains(":memory:") {
        return Err(StoreError::Url(
            "--from must name a SQLite file (sqlite://…)",
        ));
    }
    if !(to.starts_with("postgres://") || to.starts_with("postgresql://")) {
        return Err(StoreError::Url(
            "--to must name a PostgreSQL database (postgres://…)",
        ));
    }
    // The source must exist (opening it would otherwise make an empty one, and the copy of
    // nothing would look like a success).
    let file = SqliteStore::database_file(from)?.ok_or(StoreError::Url(
        "--from must name a SQLite file (sqlite://…)",
    ))?;
    if !file.is_file() {
        return Err(StoreError::Audit(format!(
            "there is no SQLite database at {} (nothing was written)",
            file.display()
        )));
    }
    // Each side's migrations bring its schema up to date (the source's, as origin's next start
    // would, so its columns are the ones this build reads).
    SqliteStore::open(from, None).await?.close().await;
    PgStore::open(to, None).await?.close().await;

    let source = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(SqliteConnectOptions::from_str(from)?.read_only(true))
        .await?;
    let target = PgPoolOptions::new().max_connections(1).connect(to).await?;
    let mut read = source.begin().await?;
    let mut write = target.begin().await?;
    postgres::lock_writes(&mut write).await?;
    refuse_non_empty(&mut write).await?;
    refuse_unanchored(&mut read).await?;
    let (keys, entries): (i64, i64) =
        sqlx::query_as("SELECT (SELECT COUNT(*) FROM api_keys), (SELECT COUNT(*) FROM audit_log)")
            .fetch_one(&mut *read)
            .await?;
    if keys == 0 && entries == 0 {
        return Err(StoreError::Audit(format!(
            "{} holds no key and no audit entry: nothing to copy (is --from the right file?)",
            file.display()
        )));
    }

    let keys = copy_keys(&mut read, &mut write).await?;
    let (audit_entries, newest) = copy_audit_log(&mut read, &mut write).await?;
    let outbox_rows = copy_outbox(&mut read, &mut write).await?;
    let other_rows = copy_small_tables(&mut read, &mut write).await?;
    write.commit().await?;
    // From here the copy is committed: what follows cannot fail it. The read transaction wrote
    // nothing; its end only frees the file.
    if let Err(error) = read.rollback().await {
        tracing::debug!(%error, "the source's read transaction did not end cleanly (nothing was written to it)");
    }
    source.close().await;
    // The planner's statistics and the visibility map of the tables just filled: without them,
    // the first minutes of serving (until autovacuum comes) would scan every key for a
    // metadata filter instead of reading its index, and count a subject's keys from the heap.
    // VACUUM runs outside a transaction, after the commit: the copy is whole whatever it does,
    // so a failure is only a warning (autovacuum does the same a little later).
    if let Err(error) = sqlx::query("VACUUM (ANALYZE) api_keys, audit_log, kv_outbox")
        .execute(&target)
        .await
    {
        tracing::warn!(%error, "the copy is committed, but VACUUM (ANALYZE) of it failed: run it before serving, or let autovacuum");
    }
    target.close().await;
    Ok(Copied {
        keys,
        audit_entries,
        newest,
        outbox_rows,
        other_rows,
    })
}

async fn refuse_non_empty(write: &mut PgConnection) -> Result<(), StoreError> {
    let (keys, entries): (i64, i64) =
        sqlx::query_as("SELECT (SELECT COUNT(*) FROM api_keys), (SELECT COUNT(*) FROM audit_log)")
            .fetch_one(&mut *write)
            .await?;
    if keys > 0 || entries > 0 {
        return Err(StoreError::Audit(format!(
            "the target already holds {keys} keys and {entries} audit entries: copy into an \
             empty database only (nothing was written)"
        )));
    }
    Ok(())
}

/// A chain that ends with unkeyed entries is anchored on SQLite first (`origin audit anchor`):
/// origin on PostgreSQL refuses to write onto it, and never anchors.
async fn refuse_unanchored(read: &mut SqliteConnection) -> Result<(), StoreError> {
    let newest: Option<(i64, i64)> =
        sqlx::query_as("SELECT seq, chain FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *read)
            .await?;
    match newest {
        Some((seq, chain)) if chain != audit::CHAIN_KEYED => Err(StoreError::Audit(format!(
            "the source's newest audit entry ({seq}) is unkeyed: anchor it first with `origin \
             audit anchor` on the SQLite database (nothing was written)"
        ))),
        _ => Ok(()),
    }
}

async fn copy_keys(
    read: &mut Transaction<'_, Sqlite>,
    write: &mut Transaction<'_, Postgres>,
) -> Result<u64, StoreError> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id > ? ORDER BY id LIMIT ?");
    let (mut after, mut copied) = (String::new(), 0u64);
    loop {
        let rows: Vec<KeyRow> = sqlx::query_as(&sql)
            .bind(&after)
            .bind(PAGE)
            .fetch_all(&mut **read)
            .await?;
        let Some(last) = rows.last() else {
            return Ok(copied);
        };
        after.clone_from(&last.id);
        // Read back as origin reads it: a corrupt row stops the copy, naming it.
        let keys = rows
            .into_iter()
            .map(StoredKey::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let mut insert =
            QueryBuilder::<Postgres>::new(format!("INSERT INTO api_keys ({KEY_COLUMNS}) "));
        insert.push_values(&keys, |mut row, key| {
            for column in key_columns() {
                bind_stored!(row, column_value(key, column), push_bind);
            }
        });
        insert.build().execute(&mut **write).await?;
        copied += u64::try_from(keys.len()).unwrap_or(0);
    }
}

async fn copy_audit_log(
    read: &mut Transaction<'_, Sqlite>,
    write: &mut Transaction<'_, Postgres>,
) -> Result<(u64, Option<(i64, String)>), StoreError> {
    let (mut after, mut copied, mut newest) = (0i64, 0u64, None);
    loop {
        let rows: Vec<AuditRow> = sqlx::query_as(
            "SELECT seq, at, actor, action, key_id, details, prev_hash, hash, chain \
             FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(after)
        .bind(PAGE)
        .fetch_all(&mut **read)
        .await?;
        if rows.is_empty() {
            return Ok((copied, newest));
        }
        let mut insert = QueryBuilder::<Postgres>::new(
            "INSERT INTO audit_log (seq, at, actor, action, key_id, details, prev_hash, hash, \
             chain) ",
        );
        insert.push_values(&rows, |mut row, entry| {
            let (seq, at, actor, action, key_id, details, prev_hash, hash, chain) = entry;
            row.push_bind(*seq)
                .push_bind(*at)
                .push_bind(actor.clone())
                .push_bind(action.clone())
                .push_bind(key_id.clone())
                .push_bind(details.clone())
                .push_bind(prev_hash.clone())
                .push_bind(hash.clone())
                .push_bind(*chain);
        });
        insert.build().execute(&mut **write).await?;
        copied += u64::try_from(rows.len()).unwrap_or(0);
        if let Some(last) = rows.last() {
            after = last.0;
            newest = Some((last.0, last.7.clone()));
        }
    }
}

/// The outbox's rows keep their numbers (their order is each sink's order), and the target's
/// numbering goes on after the last.
async fn copy_outbox(
    read: &mut Transaction<'_, Sqlite>,
    write: &mut Transaction<'_, Postgres>,
) -> Result<u64, StoreError> {
    let (mut after, mut copied) = (0i64, 0u64);
    loop {
        let rows: Vec<(i64, String, i64, bool, bool, bool)> = sqlx::query_as(
            "SELECT seq, key_id, enqueued_at, kv_pending, ledger_pending, rebuild \
             FROM kv_outbox WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(after)
        .bind(PAGE)
        .fetch_all(&mut **read)
        .await?;
        if rows.is_empty() {
            break;
        }
        let mut insert = QueryBuilder::<Postgres>::new(
            "INSERT INTO kv_outbox (seq, key_id, enqueued_at, kv_pending, ledger_pending, \
             rebuild) OVERRIDING SYSTEM VALUE ",
        );
        insert.push_values(
            &rows,
            |mut row, (seq, key_id, enqueued_at, kv, ledger, rebuild)| {
                row.push_bind(*seq)
                    .push_bind(key_id.clone())
                    .push_bind(*enqueued_at)
                    .push_bind(*kv)
                    .push_bind(*ledger)
                    .push_bind(*rebuild);
            },
        );
        insert.build().execute(&mut **write).await?;
        copied += u64::try_from(rows.len()).unwrap_or(0);
        after = rows.last().map_or(after, |row| row.0);
    }
    // SQLite's AUTOINCREMENT never reuses a number, even a deleted row's: neither may the
    // target (a sink's acknowledgement names numbers).
    let used: Option<i64> =
        sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'kv_outbox'")
            .fetch_optional(&mut **read)
            .await?;
    let high = used.unwrap_or(0).max(after);
    if high > 0 {
        sqlx::query("SELECT setval(pg_get_serial_sequence('kv_outbox', 'seq'), $1)")
            .bind(high)
            .execute(&mut **write)
            .await?;
    }
    Ok(copied)
}

async fn copy_small_tables(
    read: &mut Transaction<'_, Sqlite>,
    write: &mut Transaction<'_, Postgres>,
) -> Result<u64, StoreError> {
    let mut copied = 0u64;
    let verify: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT key_id, due_at, attempts FROM kv_verify")
            .fetch_all(&mut **read)
            .await?;
    for (key_id, due_at, attempts) in verify {
        sqlx::query("INSERT INTO kv_verify (key_id, due_at, attempts) VALUES ($1, $2, $3)")
            .bind(key_id)
            .bind(due_at)
            .bind(attempts)
            .execute(&mut **write)
            .await?;
        copied += 1;
    }
    let refreshes: Vec<(String, i64)> = sqlx::query_as("SELECT key_id, at FROM ledger_refresh")
        .fetch_all(&mut **read)
        .await?;
    for (key_id, at) in refreshes {
        sqlx::query("INSERT INTO ledger_refresh (key_id, at) VALUES ($1, $2)")
            .bind(key_id)
            .bind(at)
            .execute(&mut **write)
            .await?;
        copied += 1;
    }
    let cursors: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT endpoint, after_seq, updated_at FROM webhook_cursors")
            .fetch_all(&mut **read)
            .await?;
    for (endpoint, after_seq, updated_at) in cursors {
        sqlx::query(
            "INSERT INTO webhook_cursors (endpoint, after_seq, updated_at) VALUES ($1, $2, $3)",
        )
        .bind(endpoint)
        .bind(after_seq)
        .bind(updated_at)
        .execute(&mut **write)
        .await?;
        copied += 1;
    }
    let report: Option<i64> =
        sqlx::query_scalar("SELECT last_accepted_at FROM usage_reports WHERE id = 1")
            .fetch_optional(&mut **read)
            .await?;
    if let Some(at) = report {
        sqlx::query("INSERT INTO usage_reports (id, last_accepted_at) VALUES (1, $1)")
            .bind(at)
            .execute(&mut **write)
            .await?;
        copied += 1;
    }
    let seen: Vec<(Vec<u8>, i64)> = sqlx::query_as("SELECT mac, until FROM usage_batches_seen")
        .fetch_all(&mut **read)
        .await?;
    for (mac, until) in seen {
        sqlx::query("INSERT INTO usage_batches_seen (mac, until) VALUES ($1, $2)")
            .bind(mac)
            .bind(until)
            .execute(&mut **write)
            .await?;
        copied += 1;
    }
    Ok(copied)
}
