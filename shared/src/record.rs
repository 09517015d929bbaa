//! The record origin publishes for each key and the edge reads back: one per key, named by the
//! key's hash ([`kv_entry_name`]), never containing the secret.
//!
//! # Versions
//!
//! A record crosses a deployment boundary: origin writes it, and edges built from an older or a
//! newer release read it, from KV and from the change ledger. So that old and new coexist:
//!
//! 1. **A new field is optional.** It has a default, and a record that does not use it is
//!    written without it, byte for byte as before (`#[serde(default, skip_serializing_if)]`).
//! 2. **Readers ignore fields they do not know.** A field that only informs (a reader that
//!    ignores it still decides correctly) needs nothing more.
//! 3. **A field that restricts bumps the version.** If ignoring a field would let a key do
//!    more than the writer meant (a key switched off, an address allowlist, a shorter life),
//!    the field has the version that introduced it, and a record that uses it is written with
//!    that version in `v` (records that do not use it keep the lower one, so an edge not yet
//!    upgraded still reads them).
//! 4. **Readers refuse versions newer than their own** ([`RECORD_VERSION`]): a record they
//!    cannot fully read is unreadable, and the edge denies (fails closed) rather than guess.
//! 5. **Deploy the edge first, then origin**, so that no edge meets a version it cannot read.
//!
//! ```
//! use latchkey_shared::{KeyRecord, RECORD_VERSION, RecordError};
//!
//! let v1 = br#"{"v":1,"id":"key_0123456789abcdefABCD","subject":"acme","scopes":["read:orders"],
//!     "revoked":false,"revoked_at":null,"expires_at":null,"revision":1}"#;
//! assert_eq!(KeyRecord::from_json(v1).unwrap().subject, "acme");
//!
//! // A field this build does not know, in a version it reads: ignored.
//! let informed = br#"{"v":1,"id":"key_0123456789abcdefABCD","subject":"acme","scopes":[],
//!     "revoked":false,"revoked_at":null,"expires_at":null,"revision":1,"colour":"blue"}"#;
//! assert!(KeyRecord::from_json(informed).is_ok());
//!
//! // A version newer than this build's: refused, so the edge denies.
//! let newer = format!(r#"{{"v":{},"id":"key_0123456789abcdefABCD"}}"#, RECORD_VERSION + 1);
//! assert!(matches!(KeyRecord::from_json(newer.as_bytes()), Err(RecordError::UnsupportedVersion(_))));
//! ```

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ip::IpAllowlist;
use crate::key::{KeyHash, KeyId};
use crate::scope::ScopeSet;

/// The newest record version this build reads: every version from 1 up to it (see the module's
/// "Versions"). Bumped by a field that restricts what a key may do, or a change of meaning.
///
/// | version | introduced |
/// |---|---|
/// | 1 | `id`, `subject`, `scopes`, `revoked`, `revoked_at`, `expires_at`, `revision` |
/// | 2 | `disabled` (written only when `true`) |
/// | 3 | `allowed_ips` (written only when not empty) |
///
/// Each restricting field has a version of its own, even two added in one release: a build
/// that knows only the first (a commit between them) must not read the second as absent.
pub const RECORD_VERSION: u32 = 3;

/// Milliseconds since the Unix epoch. `shared` never reads the clock: callers pass the time in.
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixMillis(pub i64);

impl UnixMillis {
    /// ISO-8601 in UTC with milliseconds, e.g. `2024-01-15T10:30:00.000Z`: the one time format
    /// of both APIs, so origin and edge print a time identically.
    pub fn to_iso8601(self) -> String {
        let secs = self.0.div_euclid(1000);
        let millis = self.0.rem_euclid(1000);
        let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
        let second_of_day = secs.rem_euclid(86_400);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            second_of_day / 3600,
            second_of_day % 3600 / 60,
            second_of_day % 60
        )
    }
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, valid for every `i64` day count this crate can produce).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Why stored bytes are not a usable record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Not JSON of the record's shape.
    #[error("record is not valid JSON of the expected shape: {0}")]
    Json(#[from] serde_json::Error),
    /// A record version this build does not understand.
    #[error(
        "record version {0} is not supported (this build reads versions 1 to {RECORD_VERSION})"
    )]
    UnsupportedVersion(u32),
}

/// The state of one key as the edge needs it to decide a verification.
///
/// Unknown fields are ignored and versions past [`RECORD_VERSION`] refused, wherever a record
/// is read (KV, or inside a ledger message): see the module's "Versions".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The record's format version: the version of the newest restricting field it uses
    /// (1 while there are none).
    #[serde(deserialize_with = "readable_version")]
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
    /// Switched off until switched on again (unlike revocation, reversible). Version 2: a
    /// record that sets it is written as version 2 (at least), so a version-1 reader refuses it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
    /// The only client addresses the key may be used from (empty: anywhere). Version 3.
    #[serde(default, skip_serializing_if = "IpAllowlist::is_empty")]
    pub allowed_ips: IpAllowlist,
}

fn is_false(b: &bool) -> bool {
    !b
}

impl KeyRecord {
    /// Serialises the record for storage, as the version its fields need
    /// ([`Self::version_needed`]), whatever `v` says: a record that sets a restricting field can
    /// never go out labelled with a version whose readers would ignore it.
    pub fn to_json(&self) -> String {
        let stamped;
        let record = if self.v == self.version_needed() {
            self
        } else {
            stamped = Self {
                v: self.version_needed(),
                ..self.clone()
            };
            &stamped
        };
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string(record).unwrap_or_default()
    }

    /// Parses stored bytes, refusing versions this build does not read.
    pub fn from_json(bytes: &[u8]) -> Result<Self, RecordError> {
        #[derive(Deserialize)]
        struct Version {
            v: u32,
        }
        // First the version alone, for a typed error naming it.
        let Version { v } = serde_json::from_slice(bytes)?;
        if !is_readable_version(v) {
            return Err(RecordError::UnsupportedVersion(v));
        }
        Ok(serde_json::from_slice(bytes)?)
    }

    /// The version to write this record as: that of the newest restricting field it uses (the
    /// table at [`RECORD_VERSION`]), so that readers of older versions still read every record
    /// that does not need more. Writers set `v` to it.
    pub fn version_needed(&self) -> u32 {
        if !self.allowed_ips.is_empty() {
            3
        } else if self.disabled {
            2
        } else {
            1
        }
    }

    /// Whether the key is past its expiry at `now`.
    pub fn is_expired(&self, now: UnixMillis) -> bool {
        is_expired_at(self.expires_at, now)
    }
}

/// Whether this build reads records of version `v`.
fn is_readable_version(v: u32) -> bool {
    (1..=RECORD_VERSION).contains(&v)
}

/// `v` as serde reads it wherever a record is embedded (a ledger message as much as KV).
fn readable_version<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    let v = u32::deserialize(deserializer)?;
    if is_readable_version(v) {
        Ok(v)
    } else {
        Err(serde::de::Error::custom(RecordError::UnsupportedVersion(v)))
    }
}

/// The one expiry rule: a key expiring at `expires_at` is expired from that instant on.
pub fn is_expired_at(expires_at: Option<UnixMillis>, now: UnixMillis) -> bool {
    expires_at.is_some_and(|at| now >= at)
}

/// The KV entry name of a key's record: `k1:` followed by the key hash in hex. The `k1` names
/// this naming scheme, so a future scheme can coexist in one namespace.
pub fn kv_entry_name(hash: &KeyHash) -> String {
    const SCHEME: &str = "k1:";
    let mut name = String::with_capacity(SCHEME.len() + 64);
    name.push_str(SCHEME);
    crate::push_hex32(&mut name, hash.as_bytes());
    name
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

    #[test]
    fn kv_entry_names_are_k1_and_the_hash_in_lowercase_hex() {
        // The name is the contract between origin, which writes it, and the edge, which reads it.
        let hex = "00ff10a9b2c3d4e5f60718293a4b5c6d7e8f90abcdef0123456789abcdef0f1e";
        let hash = KeyHash::parse(hex).expect("64 lowercase hex digits");
        let name = kv_entry_name(&hash);
        assert_eq!(name, format!("k1:{hex}"));
        assert_eq!(&name[3..], hash.to_hex());
        assert!(crate::ledger::is_entry_name(&name), "{name}");
    }

    #[test]
    fn iso8601_matches_known_instants() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (-1, "1969-12-31T23:59:59.999Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (1_700_000_000_123, "2023-11-14T22:13:20.123Z"),
            (4_102_444_799_999, "2099-12-31T23:59:59.999Z"),
            (253_402_300_799_000, "9999-12-31T23:59:59.000Z"),
        ];
        for (millis, want) in cases {
            assert_eq!(UnixMillis(millis).to_iso8601(), want, "{millis}");
        }
    }

    fn record() -> KeyRecord {
        KeyRecord {
            v: 1,
            id: KeyId::parse("key_0123456789abcdefABCD").expect("valid id"),
            subject: "acme-corp".into(),
            scopes: ScopePolicy::default()
                .parse_grants(&["read:orders"])
                .expect("valid"),
            revoked: false,
            revoked_at: None,
            expires_at: Some(UnixMillis(1_700_000_000_000)),
            revision: 3,
            disabled: false,
            allowed_ips: Default::default(),
        }
    }

    /// The reader of every build before the versioning policy, as it was: version 1 only, and
    /// no field it does not know. Edges running such a build may meet what this build writes.
    fn version_1_reader(json: &str) -> Result<(), String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code, reason = "only parsed")]
        struct V1 {
            v: u32,
            id: KeyId,
            subject: String,
            scopes: ScopeSet,
            revoked: bool,
            revoked_at: Option<UnixMillis>,
            expires_at: Option<UnixMillis>,
            revision: u64,
        }
        let parsed: V1 = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if parsed.v == 1 {
            Ok(())
        } else {
            Err(format!("version {}", parsed.v))
        }
    }

    /// A reader of version 2 as this policy has it (versions up to 2, unknown fields ignored):
    /// a build that knew `disabled` but not `allowed_ips`.
    fn version_2_reader(json: &str) -> Result<(), String> {
        #[derive(Deserialize)]
        struct Version {
            v: u32,
        }
        let Version { v } = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if (1..=2).contains(&v) {
            Ok(())
        } else {
            Err(format!("version {v}"))
        }
    }

    /// A record as origin writes it: `v` stamped from what it uses.
    fn written(mut record: KeyRecord) -> String {
        record.v = record.version_needed();
        record.to_json()
    }

    #[test]
    fn an_older_reader_reads_every_record_that_needs_nothing_newer() {
        let plain = written(record());
        assert_eq!(plain, WRITTEN_V1);
        assert_eq!(version_1_reader(&plain), Ok(()));
        let revoked = written(KeyRecord {
            revoked: true,
            revoked_at: Some(UnixMillis(5)),
            ..record()
        });
        assert_eq!(version_1_reader(&revoked), Ok(()));
    }

    #[test]
    fn the_version_written_is_the_one_the_fields_need() {
        // Whatever `v` a caller left in the struct.
        let mislabelled = KeyRecord {
            v: 1,
            disabled: true,
            ..record()
        };
        assert!(mislabelled.to_json().starts_with(r#"{"v":2,"#));
        let overstated = KeyRecord { v: 2, ..record() };
        assert_eq!(overstated.to_json(), WRITTEN_V1);
    }

    #[test]
    fn an_allowlist_is_version_3_and_read_back_strictly() {
        let listed = KeyRecord {
            allowed_ips: IpAllowlist::parse(&["203.0.113.0/24"]).expect("valid"),
            ..record()
        };
        let json = written(listed.clone());
        assert!(json.starts_with(r#"{"v":3,"#), "{json}");
        assert!(
            json.ends_with(r#","allowed_ips":["203.0.113.0/24"]}"#),
            "{json}"
        );
        assert!(version_1_reader(&json).is_err(), "{json}");
        // A build that knew `disabled` but not `allowed_ips` refuses it too.
        assert!(version_2_reader(&json).is_err(), "{json}");
        let disabled = written(KeyRecord {
            disabled: true,
            ..record()
        });
        assert_eq!(version_2_reader(&disabled), Ok(()));
        let read = KeyRecord::from_json(json.as_bytes()).expect("reads version 3");
        assert_eq!(read.allowed_ips, listed.allowed_ips);
        // A list that does not parse makes the record unreadable, never unrestricted.
        let bad = json.replace("203.0.113.0/24", "203.0.113.7/24");
        assert!(KeyRecord::from_json(bad.as_bytes()).is_err(), "{bad}");
    }

    #[test]
    fn a_record_with_a_restricting_field_is_refused_by_an_older_reader() {
        let disabled = written(KeyRecord {
            disabled: true,
            ..record()
        });
        assert!(disabled.starts_with(r#"{"v":2,"#), "{disabled}");
        assert!(disabled.ends_with(r#","disabled":true}"#), "{disabled}");
        // The reader of the last release refuses it: that edge denies the key (fails closed).
        assert!(version_1_reader(&disabled).is_err(), "{disabled}");
        // This build reads it, and keeps the field.
        let read = KeyRecord::from_json(disabled.as_bytes()).expect("reads version 2");
        assert!(read.disabled);
        // Enabled again, the record needs version 1 again, and every reader reads it.
        let enabled = written(KeyRecord {
            disabled: false,
            ..read
        });
        assert_eq!(version_1_reader(&enabled), Ok(()));
    }

    /// The exact bytes every build so far writes for [`record`]: a newer reader must go on
    /// reading them.
    const WRITTEN_V1: &str = r#"{"v":1,"id":"key_0123456789abcdefABCD","subject":"acme-corp","scopes":["read:orders"],"revoked":false,"revoked_at":null,"expires_at":1700000000000,"revision":3}"#;

    #[test]
    fn a_newer_reader_reads_an_older_record() {
        assert_eq!(
            KeyRecord::from_json(WRITTEN_V1.as_bytes()).expect("parses"),
            record()
        );
    }

    #[test]
    fn a_record_that_uses_no_newer_field_is_written_as_before() {
        assert_eq!(record().to_json(), WRITTEN_V1);
    }

    #[test]
    fn fields_a_reader_does_not_know_are_ignored() {
        // As an older reader meets a field added later that only informs.
        for extra in [
            r#""note":"x""#,
            r#""limits":{"rps":5}"#,
            r#""labels":[1,2]"#,
        ] {
            let json =
                WRITTEN_V1.replace(r#","revision":3}"#, &format!(r#","revision":3,{extra}}}"#));
            assert_eq!(
                KeyRecord::from_json(json.as_bytes()).expect(&json),
                record()
            );
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
    fn an_older_reader_refuses_a_newer_record() {
        // As this build meets a record written by a newer origin: refused, whatever it holds,
        // so the edge denies rather than decide without the field that needed the new version.
        for v in [0, RECORD_VERSION + 1, u32::MAX] {
            let json = WRITTEN_V1.replace(r#""v":1"#, &format!(r#""v":{v}"#));
            assert!(
                matches!(KeyRecord::from_json(json.as_bytes()), Err(RecordError::UnsupportedVersion(got)) if got == v),
                "{json}"
            );
            // Embedded in another message (a ledger entry), the same rule holds.
            let embedded = format!(r#"{{"record":{json}}}"#);
            #[derive(Debug, Deserialize)]
            #[allow(dead_code, reason = "only parsed")]
            struct Wrapper {
                record: KeyRecord,
            }
            let refused = serde_json::from_str::<Wrapper>(&embedded).expect_err(&embedded);
            assert!(
                refused.to_string().contains("is not supported"),
                "{refused}"
            );
        }
    }

    #[test]
    fn rejects_bad_shapes() {
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
