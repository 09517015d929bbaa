//! How a key is stored: its columns, said once (`KEY_COLUMNS`, `bind_column`), written by
//! `insert_key` / `update_key`, read back by column name (`key_row`, `KeyRow`), and the list's
//! filters (`push_filter`).

use super::*;

pub(super) const KEY_COLUMNS: &str = "id, secret_hash, hint, name, subject, description, scopes, claims, created_by, \
     expiration, revoked, revoked_at, revocation_reason, last_used_at, created_at, updated_at, revision, \
     disabled, allowed_ips, rolled_from, rolled_to, leaked_at, leak_source, key_type, deleted_at";

/// The columns a change may write: every column but the key's identity, its creation and its
/// use (`last_used_at` is written by the usage flush alone).
pub(super) const CHANGEABLE_COLUMNS: &[&str] = &[
    "name",
    "subject",
    "description",
    "scopes",
    "claims",
    "expiration",
    "revoked",
    "revoked_at",
    "revocation_reason",
    "updated_at",
    "revision",
    "disabled",
    "allowed_ips",
    "rolled_to",
    "leaked_at",
    "leak_source",
    "deleted_at",
];

pub(super) type KeyQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Binds `key`'s value of `column` (a name from [`KEY_COLUMNS`]): the one place that says how
/// a field is stored.
pub(super) fn bind_column<'q>(
    query: KeyQuery<'q>,
    key: &'q StoredKey,
    column: &str,
) -> KeyQuery<'q> {
    match column {
        "id" => query.bind(key.id.as_str()),
        "secret_hash" => query.bind(key.hash.as_bytes().as_slice()),
        "hint" => query.bind(&key.hint),
        "name" => query.bind(&key.name),
        "subject" => query.bind(&key.subject),
        "description" => query.bind(&key.description),
        "scopes" => query.bind(json_text(&key.scopes)),
        "claims" => query.bind(key.claims.as_ref().map(json_text)),
        "created_by" => query.bind(&key.created_by),
        "expiration" => query.bind(key.expiration.map(|t| t.0)),
        "revoked" => query.bind(key.revoked),
        "revoked_at" => query.bind(key.revoked_at.map(|t| t.0)),
        "revocation_reason" => query.bind(&key.revocation_reason),
        "last_used_at" => query.bind(key.last_used_at.map(|t| t.0)),
        "created_at" => query.bind(key.created_at.0),
        "updated_at" => query.bind(key.updated_at.0),
        "revision" => query.bind(key.revision),
        "disabled" => query.bind(key.disabled),
        // The list as JSON, or NULL for none.
        "allowed_ips" => {
            query.bind((!key.allowed_ips.is_empty()).then(|| json_text(&key.allowed_ips)))
        }
        "rolled_from" => query.bind(key.rolled_from.as_ref().map(KeyId::as_str)),
        "rolled_to" => query.bind(key.rolled_to.as_ref().map(KeyId::as_str)),
        "leaked_at" => query.bind(key.leaked_at.map(|t| t.0)),
        "leak_source" => query.bind(&key.leak_source),
        "key_type" => query.bind(&key.key_type),
        "deleted_at" => query.bind(key.deleted_at.map(|t| t.0)),
        #[allow(
            clippy::panic,
            reason = "a programming error, caught by every test that writes a key"
        )]
        other => panic!("no stored field for column {other}"),
    }
}

pub(super) fn key_columns() -> impl Iterator<Item = &'static str> {
    KEY_COLUMNS.split(',').map(str::trim)
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

/// The position of column `name` in [`KEY_COLUMNS`], worked out at compile time: rows are read
/// by position (reading by name searched the 17 names for every column of every verify), and a
/// name that is not in the list fails the build.
#[allow(
    clippy::panic,
    reason = "only ever evaluated in const blocks: a name not in the list fails the build"
)]
pub(super) const fn column(name: &str) -> usize {
    let columns = KEY_COLUMNS.as_bytes();
    let name = name.as_bytes();
    let (mut index, mut start, mut i) = (0, 0, 0);
    while i <= columns.len() {
        if i == columns.len() || columns[i] == b',' {
            let mut first = start;
            while first < i && columns[first] == b' ' {
                first += 1;
            }
            if i - first == name.len() {
                let mut k = 0;
                while k < name.len() && columns[first + k] == name[k] {
                    k += 1;
                }
                if k == name.len() {
                    return index;
                }
            }
            index += 1;
            start = i + 1;
        }
        i += 1;
    }
    panic!("not a column of KEY_COLUMNS");
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

#[derive(sqlx::FromRow)]
pub(super) struct KeyRow {
    pub(super) id: String,
    pub(super) secret_hash: Vec<u8>,
    pub(super) hint: String,
    pub(super) name: String,
    pub(super) subject: String,
    pub(super) description: Option<String>,
    pub(super) scopes: String,
    pub(super) claims: Option<String>,
    pub(super) created_by: Option<String>,
    pub(super) expiration: Option<i64>,
    pub(super) revoked: bool,
    pub(super) revoked_at: Option<i64>,
    pub(super) revocation_reason: Option<String>,
    pub(super) last_used_at: Option<i64>,
    pub(super) created_at: i64,
    pub(super) updated_at: i64,
    pub(super) revision: i64,
    pub(super) disabled: bool,
    pub(super) allowed_ips: Option<String>,
    pub(super) rolled_from: Option<String>,
    pub(super) rolled_to: Option<String>,
    pub(super) leaked_at: Option<i64>,
    pub(super) leak_source: Option<String>,
    pub(super) key_type: String,
    pub(super) deleted_at: Option<i64>,
}

impl TryFrom<KeyRow> for StoredKey {
    type Error = StoreError;

    fn try_from(row: KeyRow) -> Result<Self, StoreError> {
        let corrupt = |problem: String| StoreError::Corrupt {
            id: row.id.clone(),
            problem,
        };
        let id = KeyId::parse(&row.id).map_err(|e| corrupt(e.to_string()))?;
        let hash: [u8; 32] = row
            .secret_hash
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("secret_hash is not 32 bytes".into()))?;
        let scopes: ScopeSet =
            serde_json::from_str(&row.scopes).map_err(|e| corrupt(format!("scopes: {e}")))?;
        let allowed_ips: IpAllowlist = row
            .allowed_ips
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| corrupt(format!("allowed_ips: {e}")))?
            .unwrap_or_default();
        let link = |id: Option<&str>, field: &str| {
            id.map(KeyId::parse)
                .transpose()
                .map_err(|e| corrupt(format!("{field}: {e}")))
        };
        let rolled_from = link(row.rolled_from.as_deref(), "rolled_from")?;
        let rolled_to = link(row.rolled_to.as_deref(), "rolled_to")?;
        let claims: Option<Map<String, Value>> = row
            .claims
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| corrupt(format!("claims: {e}")))?;
        Ok(Self {
            id,
            hash: KeyHash::from_bytes(hash),
            hint: row.hint,
            name: row.name,
            subject: row.subject,
            description: row.description,
            scopes,
            claims,
            created_by: row.created_by,
            expiration: row.expiration.map(UnixMillis),
            revoked: row.revoked,
            revoked_at: row.revoked_at.map(UnixMillis),
            revocation_reason: row.revocation_reason,
            last_used_at: row.last_used_at.map(UnixMillis),
            created_at: UnixMillis(row.created_at),
            updated_at: UnixMillis(row.updated_at),
            revision: row.revision,
            disabled: row.disabled,
            allowed_ips,
            rolled_from,
            rolled_to,
            leaked_at: row.leaked_at.map(UnixMillis),
            leak_source: row.leak_source,
            key_type: row.key_type,
            deleted_at: row.deleted_at.map(UnixMillis),
        })
    }
}

pub(super) fn json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
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
