//! The audit chain in SQLite: checked at start against the checkpoints, and each entry
//! appended after the newest, in the writer's transaction (`BEGIN IMMEDIATE` holds SQLite's
//! write lock, so even origins on other processes append one at a time).

use super::*;

/// At start with a key: the log must not end before the newest checkpoint (entries deleted),
/// must not be empty while keys exist (wiped), and its newest entry must verify with the key
/// (see [`check_newest`]).
pub(super) async fn check_chain_at_start(
    writer: &SqlitePool,
    chain: &AuditChain,
) -> Result<(), StoreError> {
    let newest: Option<AuditRow> = sqlx::query_as(
        "SELECT seq, at, actor, action, key_id, details, prev_hash, hash, chain FROM audit_log \
         ORDER BY seq DESC LIMIT 1",
    )
    .fetch_optional(writer)
    .await?;
    let last = newest.as_ref().map_or(0, |row| row.0);
    refuse_truncated(chain, last)?;
    let Some(row) = newest else {
        let keys: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(writer)
            .await?;
        return refuse_wiped(keys);
    };
    check_newest(chain, row)
}

/// The newest audit entry's `seq` and `hash`, read inside the caller's transaction; `None` for
/// an empty log.
pub(super) async fn newest_entry(
    conn: &mut SqliteConnection,
) -> Result<Option<(i64, String)>, StoreError> {
    Ok(
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(conn)
            .await?,
    )
}

/// Appends `event` to the chain inside the caller's transaction, MACed with the chain's key.
/// Returns the new entry's `seq`, `hash` and `at` (for the checkpoint after the commit).
/// `last`: the newest entry's `seq` and `hash` ([`newest_entry`], or the one the same
/// transaction appended).
pub(super) async fn append_audit(
    conn: &mut SqliteConnection,
    chain: Option<&AuditChain>,
    event: &AuditEvent,
    last: Option<(i64, String)>,
) -> Result<(i64, String, i64), StoreError> {
    let entry = NextEntry::after(chain, last, event)?;
    sqlx::query(
        "INSERT INTO audit_log (seq, at, actor, action, key_id, details, prev_hash, hash, chain) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    .execute(&mut *conn)
    .await?;
    Ok(entry.written())
}
