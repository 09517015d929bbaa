//! How a key is stored, whatever the backend: its columns, said once (`KEY_COLUMNS`), each
//! field's stored value (`column_value`), and a row read back (`KeyRow`, checked into a
//! [`StoredKey`]). A backend binds the values and writes its own SQL around them.

use latchkey_shared::ip::IpAllowlist;
use latchkey_shared::{KeyHash, KeyId, ScopeSet, UnixMillis};
use serde_json::{Map, Value};

use super::StoreError;
use crate::model::StoredKey;

pub(crate) const KEY_COLUMNS: &str = "id, secret_hash, hint, name, subject, description, scopes, claims, created_by, \
     expiration, revoked, revoked_at, revocation_reason, last_used_at, created_at, updated_at, revision, \
     disabled, allowed_ips, rolled_from, rolled_to, leaked_at, leak_source, key_type, deleted_at";

/// The columns a change may write: every column but the key's identity, its creation and its
/// use (`last_used_at` is written by the usage flush alone).
pub(crate) const CHANGEABLE_COLUMNS: &[&str] = &[
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

pub(crate) fn key_columns() -> impl Iterator<Item = &'static str> {
    KEY_COLUMNS.split(',').map(str::trim)
}

/// The position of column `name` in [`KEY_COLUMNS`], worked out at compile time: rows are read
/// by position (reading by name searched the 17 names for every column of every verify), and a
/// name that is not in the list fails the build.
#[allow(
    clippy::panic,
    reason = "only ever evaluated in const blocks: a name not in the list fails the build"
)]
pub(crate) const fn column(name: &str) -> usize {
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

/// A column's stored value, as every backend binds it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Stored<'k> {
    Text(&'k str),
    OptionalText(Option<&'k str>),
    /// JSON written by origin (kept as text: bytes a reader can compare).
    Json(Option<String>),
    Bytes(&'k [u8]),
    Int(i64),
    OptionalInt(Option<i64>),
    Bool(bool),
}

/// `key`'s value of `column` (a name from [`KEY_COLUMNS`]): the one place that says how a
/// field is stored.
pub(crate) fn column_value<'k>(key: &'k StoredKey, column: &str) -> Stored<'k> {
    use Stored::{Bool, Bytes, Int, Json, OptionalInt, OptionalText, Text};
    match column {
        "id" => Text(key.id.as_str()),
        "secret_hash" => Bytes(key.hash.as_bytes().as_slice()),
        "hint" => Text(&key.hint),
        "name" => Text(&key.name),
        "subject" => Text(&key.subject),
        "description" => OptionalText(key.description.as_deref()),
        "scopes" => Json(Some(json_text(&key.scopes))),
        "claims" => Json(key.claims.as_ref().map(json_text)),
        "created_by" => OptionalText(key.created_by.as_deref()),
        "expiration" => OptionalInt(key.expiration.map(|t| t.0)),
        "revoked" => Bool(key.revoked),
        "revoked_at" => OptionalInt(key.revoked_at.map(|t| t.0)),
        "revocation_reason" => OptionalText(key.revocation_reason.as_deref()),
        "last_used_at" => OptionalInt(key.last_used_at.map(|t| t.0)),
        "created_at" => Int(key.created_at.0),
        "updated_at" => Int(key.updated_at.0),
        "revision" => Int(key.revision),
        "disabled" => Bool(key.disabled),
        // The list as JSON, or NULL for none.
        "allowed_ips" => Json((!key.allowed_ips.is_empty()).then(|| json_text(&key.allowed_ips))),
        "rolled_from" => OptionalText(key.rolled_from.as_ref().map(KeyId::as_str)),
        "rolled_to" => OptionalText(key.rolled_to.as_ref().map(KeyId::as_str)),
        "leaked_at" => OptionalInt(key.leaked_at.map(|t| t.0)),
        "leak_source" => OptionalText(key.leak_source.as_deref()),
        "key_type" => Text(&key.key_type),
        "deleted_at" => OptionalInt(key.deleted_at.map(|t| t.0)),
        #[allow(
            clippy::panic,
            reason = "a programming error, caught by every test that writes a key"
        )]
        other => panic!("no stored field for column {other}"),
    }
}

/// Binds a stored value to a query of any backend that stores these types (`bind_stored!(query,
/// value)`), or pushes it to a query builder's row (`bind_stored!(row, value, push_bind)`).
macro_rules! bind_stored {
    ($query:expr, $value:expr) => {
        $crate::store::key_row::bind_stored!($query, $value, bind)
    };
    ($query:expr, $value:expr, $method:ident) => {
        match $value {
            $crate::store::key_row::Stored::Text(v) => $query.$method(v),
            $crate::store::key_row::Stored::OptionalText(v) => $query.$method(v),
            $crate::store::key_row::Stored::Json(v) => $query.$method(v),
            $crate::store::key_row::Stored::Bytes(v) => $query.$method(v),
            $crate::store::key_row::Stored::Int(v) => $query.$method(v),
            $crate::store::key_row::Stored::OptionalInt(v) => $query.$method(v),
            $crate::store::key_row::Stored::Bool(v) => $query.$method(v),
        }
    };
}
pub(crate) use bind_stored;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_column_has_a_stored_value_and_a_position() {
        let key = crate::store::conformance::key(1, "acme");
        for (index, name) in key_columns().enumerate() {
            let _ = column_value(&key, name);
            assert_eq!(column(name), index, "{name}");
        }
        for name in CHANGEABLE_COLUMNS {
            assert!(key_columns().any(|c| c == *name), "{name} is a column");
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct KeyRow {
    pub(crate) id: String,
    pub(crate) secret_hash: Vec<u8>,
    pub(crate) hint: String,
    pub(crate) name: String,
    pub(crate) subject: String,
    pub(crate) description: Option<String>,
    pub(crate) scopes: String,
    pub(crate) claims: Option<String>,
    pub(crate) created_by: Option<String>,
    pub(crate) expiration: Option<i64>,
    pub(crate) revoked: bool,
    pub(crate) revoked_at: Option<i64>,
    pub(crate) revocation_reason: Option<String>,
    pub(crate) last_used_at: Option<i64>,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
    pub(crate) revision: i64,
    pub(crate) disabled: bool,
    pub(crate) allowed_ips: Option<String>,
    pub(crate) rolled_from: Option<String>,
    pub(crate) rolled_to: Option<String>,
    pub(crate) leaked_at: Option<i64>,
    pub(crate) leak_source: Option<String>,
    pub(crate) key_type: String,
    pub(crate) deleted_at: Option<i64>,
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

pub(crate) fn json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
