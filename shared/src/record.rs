//! The record origin publishes for each key and the edge reads back: one per key, named by the
//! key's hash ([`kv_entry_name`]), never containing the secret.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::key::{KeyHash, KeyId};
use crate::scope::ScopeSet;

/// The record format version written by this crate. Bump it when a field changes meaning;
/// readers reject versions they do not know rather than guess.
pub const RECORD_VERSION: u32 = 1;

/// Milliseconds since the Unix epoch. `shared` never reads the clock: callers pass the time in.
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixMillis(pub i64);

/// Why stored bytes are not a usable record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Not JSON of the record's shape.
    #[error("record is not valid JSON of the expected shape: {0}")]
    Json(#[from] serde_json::Error),
    /// A record version this build does not understand.
    #[error("record version {0} is not supported (this build reads version {RECORD_VERSION})")]
    UnsupportedVersion(u32),
}

/// The state of one key as the edge needs it to decide a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// Format version, always [`RECORD_VERSION`] when written by this build.
    pub v: u32,
    /// The key's public id.
    pub id: KeyId,
    /// Whom the key was issued to (a partner, user or organisation id).
    pub subject: String,
    /// The scopes granted.
    pub scopes: ScopeSet,
    /// Whether the key has been revoked. Revocation is final.
    pub revoked: bool,
    /// When the key was revoked.
    pub revoked_at: Option<UnixMillis>,
    /// When the key stops being valid, if ever.
    pub expires_at: Option<UnixMillis>,
    /// Increases with every change of the key, so a reader can ignore a stale write.
    pub revision: u64,
}

impl KeyRecord {
    /// Serialises the record for storage.
    pub fn to_json(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses stored bytes, rejecting unknown versions.
    pub fn from_json(bytes: &[u8]) -> Result<Self, RecordError> {
        #[derive(Deserialize)]
        struct Version {
            v: u32,
        }
        let Version { v } = serde_json::from_slice(bytes)?;
        if v != RECORD_VERSION {
            return Err(RecordError::UnsupportedVersion(v));
        }
        Ok(serde_json::from_slice(bytes)?)
    }

    /// Whether the key is past its expiry at `now`.
    pub fn is_expired(&self, now: UnixMillis) -> bool {
        is_expired_at(self.expires_at, now)
    }
}

/// The one expiry rule: a key expiring at `expires_at` is expired from that instant on.
pub fn is_expired_at(expires_at: Option<UnixMillis>, now: UnixMillis) -> bool {
    expires_at.is_some_and(|at| now >= at)
}

/// The KV entry name of a key's record: `k1:` followed by the key hash in hex. The `k1` names
/// this naming scheme, so a future scheme can coexist in one namespace.
pub fn kv_entry_name(hash: &KeyHash) -> String {
    format!("k1:{}", hash.to_hex())
}

impl Serialize for KeyId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        KeyId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::ScopePolicy;

    fn record() -> KeyRecord {
        KeyRecord {
            v: RECORD_VERSION,
            id: KeyId::parse("key_0123456789abcdefABCD").expect("valid id"),
            subject: "acme-corp".into(),
            scopes: ScopePolicy::default()
                .parse_grants(&["read:orders"])
                .expect("valid"),
            revoked: false,
            revoked_at: None,
            expires_at: Some(UnixMillis(1_700_000_000_000)),
            revision: 3,
        }
    }

    #[test]
    fn round_trips_through_json() {
        let r = record();
        let json = r.to_json();
        assert_eq!(
            json,
            r#"{"v":1,"id":"key_0123456789abcdefABCD","subject":"acme-corp","scopes":["read:orders"],"revoked":false,"revoked_at":null,"expires_at":1700000000000,"revision":3}"#
        );
        assert_eq!(KeyRecord::from_json(json.as_bytes()).expect("parses"), r);
    }

    #[test]
    fn rejects_unknown_versions_and_shapes() {
        let future = record().to_json().replace(r#""v":1"#, r#""v":2"#);
        assert!(matches!(
            KeyRecord::from_json(future.as_bytes()),
            Err(RecordError::UnsupportedVersion(2))
        ));
        for bad in ["", "{}", "[]", r#"{"v":1}"#, "null", r#"{"v":"1"}"#] {
            assert!(KeyRecord::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
        let bad_id = record()
            .to_json()
            .replace("key_0123456789abcdefABCD", "key_x");
        assert!(KeyRecord::from_json(bad_id.as_bytes()).is_err());
    }

    #[test]
    fn expiry_is_inclusive_of_the_instant() {
        let r = record();
        assert!(!r.is_expired(UnixMillis(1_699_999_999_999)));
        assert!(r.is_expired(UnixMillis(1_700_000_000_000)));
    }
}
