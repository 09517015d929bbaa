//! How PostgreSQL stores a key (the columns and values are `store::key_row`'s): written by
//! `insert_key` / `update_key`, and the list's filters (`push_filter`), each served by an index
//! of the schema.

use super::*;

type KeyQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

/// Binds `key`'s value of `column`.
fn bind_column<'q>(query: KeyQuery<'q>, key: &'q StoredKey, column: &str) -> KeyQuery<'q> {
    bind_stored!(query, column_value(key, column))
}

/// `$1, $2, …, $n`.
fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `INSERT` of a whole key, its values bound in [`KEY_COLUMNS`] order.
static INSERT_KEY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ({})",
        placeholders(key_columns().count())
    )
});

/// `UPDATE` of a key's [`CHANGEABLE_COLUMNS`], if its revision is still the expected one.
static UPDATE_KEY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let set: Vec<String> = CHANGEABLE_COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{c} = ${}", i + 1))
        .collect();
    let n = CHANGEABLE_COLUMNS.len();
    format!(
        "UPDATE api_keys SET {} WHERE id = ${} AND revision = ${}",
        set.join(", "),
        n + 1,
        n + 2
    )
});

pub(super) async fn insert_key(conn: &mut PgConnection, key: &StoredKey) -> Result<(), StoreError> {
    key_columns()
        .fold(sqlx::query(&INSERT_KEY), |q, c| bind_column(q, key, c))
        .execute(conn)
        .await?;
    Ok(())
}

/// `false`: the key is not at `expected_revision` any more, and nothing was written.
pub(super) async fn update_key(
    conn: &mut PgConnection,
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

/// Adds the WHERE clause of `filter` (shared by the page query and the count). Live keys by
/// subject or by creation are the partial indexes `api_keys_live_by_subject` and
/// `api_keys_live_by_created`; a metadata field is a containment test on the parsed claims
/// (`claims_jsonb`) the GIN index `api_keys_live_by_claims` answers.
pub(super) fn push_filter(qb: &mut QueryBuilder<'_, Postgres>, filter: &ListFilter) {
    // A deleted key is never listed.
    qb.push(" WHERE deleted_at IS NULL");
    if let Some(subject) = &filter.subject {
        qb.push(" AND subject = ").push_bind(subject.clone());
    }
    if let Some(key_type) = &filter.key_type {
        qb.push(" AND key_type = ").push_bind(key_type.clone());
    }
    if let Some(text) = &filter.name_contains {
        // LIKE's own wildcards in the text are literal: escaped with `\`. ILIKE: the same
        // case-insensitive match as SQLite's LIKE (which folds ASCII only; this folds more).
        let escaped = text
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        qb.push(" AND name ILIKE ")
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
        // The field and the value are bound, never spliced into SQL: the claims contain
        // `{field: value}` (the index's test), and the field is exactly that JSON string (the
        // containment of a string in an array would also pass the first test).
        qb.push(" AND claims_jsonb @> jsonb_build_object(")
            .push_bind(field.clone())
            .push("::text, ")
            .push_bind(value.clone())
            .push("::text) AND claims_jsonb -> ")
            .push_bind(field.clone())
            .push("::text = to_jsonb(")
            .push_bind(value.clone())
            .push("::text)");
    }
}

/// The page of `filter` (newest first) after the WHERE clause.
fn push_page(qb: &mut QueryBuilder<'_, Postgres>, filter: &ListFilter) {
    qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(i64::from(filter.limit))
        .push(" OFFSET ")
        .push_bind(i64::from(filter.offset));
}

fn count_query(filter: &ListFilter) -> QueryBuilder<'_, Postgres> {
    let mut total = QueryBuilder::new("SELECT COUNT(*) FROM api_keys");
    push_filter(&mut total, filter);
    total
}

/// A page and its count as two statements on two connections at once (each was its own
/// snapshot anyway): the list waits for the slower, not for both. The count of a subject's or
/// of all live keys reads only its index.
pub(super) async fn page_and_count(
    pool: &PgPool,
    filter: &ListFilter,
) -> Result<(Vec<KeyRow>, i64), StoreError> {
    let mut page = QueryBuilder::new(format!("SELECT {KEY_COLUMNS} FROM api_keys"));
    push_filter(&mut page, filter);
    push_page(&mut page, filter);
    let mut total = count_query(filter);
    let (rows, (total,)): (Vec<KeyRow>, (i64,)) = tokio::try_join!(
        page.build_query_as().fetch_all(pool),
        total.build_query_as().fetch_one(pool),
    )?;
    Ok((rows, total))
}

/// A key of a page, with the count of every key the filter matches.
#[derive(sqlx::FromRow)]
struct CountedRow {
    #[sqlx(flatten)]
    key: KeyRow,
    total: i64,
}

/// A page filtered by metadata fields, counted by the same scan (`COUNT(*) OVER ()`): every
/// candidate of the GIN index is read from the table to be rechecked whatever the query, so a
/// second statement would read them all again. A page past the last match has no row to carry
/// the count, which is then asked for alone.
pub(super) async fn page_counted(
    pool: &PgPool,
    filter: &ListFilter,
) -> Result<(Vec<KeyRow>, i64), StoreError> {
    let mut page = QueryBuilder::new(format!(
        "SELECT {KEY_COLUMNS}, COUNT(*) OVER () AS total FROM api_keys"
    ));
    push_filter(&mut page, filter);
    push_page(&mut page, filter);
    let rows: Vec<CountedRow> = page.build_query_as().fetch_all(pool).await?;
    let total = match rows.first() {
        Some(row) => row.total,
        None if filter.offset == 0 => 0,
        None => {
            let (total,): (i64,) = count_query(filter).build_query_as().fetch_one(pool).await?;
            total
        }
    };
    Ok((rows.into_iter().map(|row| row.key).collect(), total))
}
