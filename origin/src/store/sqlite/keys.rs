//! How SQLite stores a key (the columns and values are `store::key_row`'s): written by
//! `insert_key` / `update_key`, read back by column position (`key_row`), and the list's
//! filters (`push_filter`).

use super::*;

type KeyQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Binds `key`'s value of `column`.
fn bind_column<'q>(query: KeyQuery<'q>, key: &'q StoredKey, column: &str) -> KeyQuery<'q> {
    bind_stored!(query, column_value(key, column))
}

/// `INSERT` of a whole key, its values bound in [`KEY_COLUMNS`] order.
static INSERT_KEY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let placeholders = vec!["?"; key_columns().count()].join(", ");
    format!("INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ({placeholders})")
});

/// `UPDATE` of a key's [`CHANGEABLE_COLUMNS`], if its revision is still the expected one.
static UPDATE_KEY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let set: Vec<String> = CHANGEABLE_COLUMNS
        .iter()
        .map(|c| format!("{c} = ?"))
        .collect();
    format!(
        "UPDATE api_keys SET {} WHERE id = ? AND revision = ?",
        set.join(", ")
    )
});

pub(super) async fn insert_key(
    conn: &mut SqliteConnection,
    key: &StoredKey,
) -> Result<(), StoreError> {
    key_columns()
        .fold(sqlx::query(&INSERT_KEY), |q, c| bind_column(q, key, c))
        .execute(conn)
        .await?;
    Ok(())
}

/// `false`: the key is not at `expected_revision` any more, and nothing was written.
pub(super) async fn update_key(
    conn: &mut SqliteConnection,
    key: &StoredKey,
    expected_revision: i64,
) -> Result<bool, StoreError> {
    let updated = CHANGEABLE_COLUMNS
        .iter()
        .fold(sqlx::query(&UPDATE_KEY), |q, c| bind_column(q, key, c))
        .bind(key.id.as_str())
        .bind(expected_revision)
        .execute(conn)
        .await?;
    Ok(updated.rows_affected() == 1)
}

/// Reads a row of `KEY_COLUMNS`, each column by its name's position.
pub(super) fn key_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
    Ok(KeyRow {
        id: row.get(const { column("id") })?,
        secret_hash: row.get(const { column("secret_hash") })?,
        hint: row.get(const { column("hint") })?,
        name: row.get(const { column("name") })?,
        subject: row.get(const { column("subject") })?,
        description: row.get(const { column("description") })?,
        scopes: row.get(const { column("scopes") })?,
        claims: row.get(const { column("claims") })?,
        created_by: row.get(const { column("created_by") })?,
        expiration: row.get(const { column("expiration") })?,
        revoked: row.get(const { column("revoked") })?,
        revoked_at: row.get(const { column("revoked_at") })?,
        revocation_reason: row.get(const { column("revocation_reason") })?,
        last_used_at: row.get(const { column("last_used_at") })?,
        created_at: row.get(const { column("created_at") })?,
        updated_at: row.get(const { column("updated_at") })?,
        revision: row.get(const { column("revision") })?,
        disabled: row.get(const { column("disabled") })?,
        allowed_ips: row.get(const { column("allowed_ips") })?,
        rolled_from: row.get(const { column("rolled_from") })?,
        rolled_to: row.get(const { column("rolled_to") })?,
        leaked_at: row.get(const { column("leaked_at") })?,
        leak_source: row.get(const { column("leak_source") })?,
        key_type: row.get(const { column("key_type") })?,
        deleted_at: row.get(const { column("deleted_at") })?,
    })
}

/// Adds the WHERE clause of `filter` (shared by the page query and the count).
pub(super) fn push_filter(qb: &mut QueryBuilder<'_, Sqlite>, filter: &ListFilter) {
    // A deleted key is never listed.
    qb.push(" WHERE deleted_at IS NULL");
    if let Some(subject) = &filter.subject {
        qb.push(" AND subject = ").push_bind(subject.clone());
    }
    if let Some(key_type) = &filter.key_type {
        qb.push(" AND key_type = ").push_bind(key_type.clone());
    }
    if let Some(text) = &filter.name_contains {
        // LIKE's own wildcards in the text are literal: escaped with `\`.
        let escaped = text
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        qb.push(" AND name LIKE ")
            .push_bind(format!("%{escaped}%"))
            .push(" ESCAPE '\\'");
    }
    if let Some(revoked) = filter.revoked {
        qb.push(" AND revoked = ").push_bind(revoked);
    }
    match filter.expired {
        Some(true) => {
            qb.push(" AND expiration IS NOT NULL AND expiration <= ")
                .push_bind(filter.now.0);
        }
        Some(false) => {
            qb.push(" AND (expiration IS NULL OR expiration > ")
                .push_bind(filter.now.0)
                .push(")");
        }
        None => {}
    }
    match filter.never_used {
        Some(true) => {
            qb.push(" AND last_used_at IS NULL");
        }
        Some(false) => {
            qb.push(" AND last_used_at IS NOT NULL");
        }
        None => {}
    }
    if let Some(before) = filter.last_used_before {
        qb.push(" AND last_used_at < ").push_bind(before.0);
    }
    for (field, value) in &filter.claims_equal {
        // The field name is bound as part of a JSON path, never spliced into SQL. Quoting it
        // makes `.` and other characters literal parts of one key.
        let path = format!("$.\"{}\"", field.replace('"', ""));
        qb.push(" AND json_extract(claims, ")
            .push_bind(path)
            .push(") = ")
            .push_bind(value.clone());
    }
}
