//! The one verification decision, shared by origin and edge so they can never disagree.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::key::{ApiKey, KeyError};
use crate::record::{KeyRecord, UnixMillis};
use crate::scope::{Scope, ScopeError};

/// Most scopes one verification may require (the most a key may hold, too).
pub const REQUIRED_SCOPES_MAX: usize = 64;

/// Longest presented string that is parsed at all; anything longer is malformed unread.
pub const PRESENTED_MAX: usize = 256;

/// The outcome of verifying a presented key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The key exists, is live, and holds every required scope.
    Valid,
    /// The key is well-formed but no record exists for it.
    NotFound,
    /// The presented string is not a key (syntax or checksum); nothing was looked up.
    Malformed,
    /// The key was revoked.
    Revoked,
    /// The key is past its expiry.
    Expired,
    /// The key is switched off (reversibly: it works again once enabled).
    Disabled,
    /// The key may be used only from listed addresses, and the client's is not one (or is not
    /// known).
    IpNotAllowed,
    /// The key is live but lacks these required scopes.
    InsufficientScope {
        /// The required scopes that no granted scope covers.
        missing: Vec<Scope>,
    },
}

impl Verdict {
    /// The stable reason code used in API responses: `VALID`, `NOT_FOUND`, `MALFORMED`,
    /// `REVOKED`, `EXPIRED`, `DISABLED`, `IP_NOT_ALLOWED` or `INSUFFICIENT_SCOPE`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Valid => "VALID",
            Self::NotFound => "NOT_FOUND",
            Self::Malformed => "MALFORMED",
            Self::Revoked => "REVOKED",
            Self::Expired => "EXPIRED",
            Self::Disabled => "DISABLED",
            Self::IpNotAllowed => "IP_NOT_ALLOWED",
            Self::InsufficientScope { .. } => "INSUFFICIENT_SCOPE",
        }
    }

    /// Whether access should be granted.
    pub fn is_valid(&self) -> bool {
        matches!(self, Self::Valid)
    }
}

impl From<KeyError> for Verdict {
    fn from(_: KeyError) -> Self {
        Self::Malformed
    }
}

/// Parses a presented key: the first step of every verification. A `Malformed` verdict here
/// means the caller must not look anything up: garbage costs no storage read.
pub fn parse_presented(presented: &str) -> Result<ApiKey, Verdict> {
    if presented.len() > PRESENTED_MAX {
        return Err(Verdict::Malformed);
    }
    ApiKey::parse(presented).map_err(Verdict::from)
}

/// Why a verification's `required_scopes` were refused (the request itself is bad, so this is
/// an error for the caller, not a verdict on the key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequiredScopesError {
    /// More than [`REQUIRED_SCOPES_MAX`] scopes.
    #[error("at most {REQUIRED_SCOPES_MAX} scopes")]
    TooMany,
    /// A scope does not parse (wildcards cannot be required).
    #[error("{0}")]
    Scope(#[from] ScopeError),
}

/// Parses the scopes a verification requires.
pub fn parse_required<S: AsRef<str>>(required: &[S]) -> Result<Vec<Scope>, RequiredScopesError> {
    if required.len() > REQUIRED_SCOPES_MAX {
        return Err(RequiredScopesError::TooMany);
    }
    Ok(required
        .iter()
        .map(|s| Scope::parse(s.as_ref()))
        .collect::<Result<_, _>>()?)
}

/// A verification request as origin's tutorial surface and the edge read it: the presented
/// `key`, the scopes the caller requires (default none) and the address the key is being used
/// from (`client_ip`, checked against the key's allowlist; default unknown, which a key with an
/// allowlist fails). Unknown fields are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// The presented key, as the partner sent it.
    pub key: String,
    /// Scopes the key must hold (see [`parse_required`]); absent or `null`: none.
    #[serde(default, deserialize_with = "null_as_default")]
    pub required_scopes: Vec<String>,
    /// The client's address (see [`crate::ip::parse_client`]).
    #[serde(default)]
    pub client_ip: Option<String>,
}

/// For a field with a default: `null` reads as the default, as an absent field does (the APIs'
/// one rule for `null`: it is the same as leaving the field out).
///
/// ```
/// #[derive(serde::Deserialize)]
/// struct Body {
///     #[serde(default, deserialize_with = "latchkey_shared::verify::null_as_default")]
///     scopes: Vec<String>,
/// }
/// let null: Body = serde_json::from_str(r#"{"scopes": null}"#).unwrap();
/// let absent: Body = serde_json::from_str("{}").unwrap();
/// assert!(null.scopes.is_empty() && absent.scopes.is_empty());
/// ```
pub fn null_as_default<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de> + Default,
{
    Option::<T>::deserialize(de).map(Option::unwrap_or_default)
}

/// The answer to a verification as both origin's tutorial surface and the edge print it, so a
/// client sees the same fields, named and formatted the same, wherever it asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The key's id, when a record was found.
    pub id: Option<String>,
    /// Whether access should be granted.
    pub valid: bool,
    /// [`Verdict::code`].
    pub code: &'static str,
    /// Whether the key found was revoked.
    pub revoked: bool,
    /// The scopes the key found grants (empty when none was found).
    pub scopes: Vec<String>,
    /// For `INSUFFICIENT_SCOPE`: the required scopes the key lacks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing_scopes: Vec<String>,
    /// When the key found expires, ISO-8601.
    pub expires_at: Option<String>,
}

impl VerifyReport {
    /// The report of `verdict`, reached from `record` (the record found, if any). A key used
    /// from an address its allowlist does not hold is reported without its details (id,
    /// scopes, expiry): from there, it is as good as unknown.
    pub fn new(verdict: &Verdict, record: Option<&KeyRecord>) -> Self {
        let record = record.filter(|_| !matches!(verdict, Verdict::IpNotAllowed));
        let missing_scopes = match verdict {
            Verdict::InsufficientScope { missing } => {
                missing.iter().map(|s| s.as_str().to_owned()).collect()
            }
            _ => Vec::new(),
        };
        Self {
            id: record.map(|r| r.id.to_string()),
            valid: verdict.is_valid(),
            code: verdict.code(),
            revoked: record.is_some_and(|r| r.revoked),
            scopes: record.map(|r| r.scopes.to_strings()).unwrap_or_default(),
            missing_scopes,
            expires_at: record
                .and_then(|r| r.expires_at)
                .map(UnixMillis::to_iso8601),
        }
    }
}

/// Everything a verification is decided against besides the key's record: when, and what the
/// caller requires. Built with [`DecisionContext::at`] and refined, so that a new condition
/// (the client's address, say) is a new method here, not a new argument at every call:
///
/// ```
/// use latchkey_shared::{DecisionContext, Scope, UnixMillis};
///
/// let required = [Scope::parse("read:orders").unwrap()];
/// let context = DecisionContext::at(UnixMillis(1_700_000_000_000)).requiring(&required);
/// assert_eq!(context.required().len(), 1);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct DecisionContext<'a> {
    now: UnixMillis,
    required: &'a [Scope],
    client: Option<IpAddr>,
}

impl<'a> DecisionContext<'a> {
    /// A verification at `now` that requires no scope (any live key passes) from an unknown
    /// address (a key with an IP allowlist fails).
    pub fn at(now: UnixMillis) -> Self {
        Self {
            now,
            required: &[],
            client: None,
        }
    }

    /// The same, requiring every scope of `required`.
    pub fn requiring(self, required: &'a [Scope]) -> Self {
        Self { required, ..self }
    }

    /// The same, for a client at `client` (as the caller knows it: the edge from
    /// `CF-Connecting-IP`, origin's verify from its request).
    pub fn from_address(self, client: Option<IpAddr>) -> Self {
        Self { client, ..self }
    }

    /// When the verification happens.
    pub fn now(&self) -> UnixMillis {
        self.now
    }

    /// The scopes the key must hold.
    pub fn required(&self) -> &'a [Scope] {
        self.required
    }
}

/// Decides a verification from the record found for the key's hash (if any) in `context`.
///
/// Order matters and is part of the contract: a revoked key answers `REVOKED` even if it has also
/// expired, is disabled or lacks a scope; an expired key answers `EXPIRED` even if disabled; a
/// disabled key answers `DISABLED` before the address check, and a key used from an address
/// its allowlist does not hold answers `IP_NOT_ALLOWED` before any scope check. (Final states
/// first, then the reversible one, then where the request comes from, then what it asks for.)
pub fn decide(record: Option<&KeyRecord>, context: &DecisionContext<'_>) -> Verdict {
    let Some(record) = record else {
        return Verdict::NotFound;
    };
    if record.revoked {
        return Verdict::Revoked;
    }
    if record.is_expired(context.now) {
        return Verdict::Expired;
    }
    if record.disabled {
        return Verdict::Disabled;
    }
    if !record.allowed_ips.is_empty()
        && !context
            .client
            .is_some_and(|client| record.allowed_ips.allows(client))
    {
        return Verdict::IpNotAllowed;
    }
    let missing: Vec<Scope> = record
        .scopes
        .missing(context.required)
        .into_iter()
        .cloned()
        .collect();
    if missing.is_empty() {
        Verdict::Valid
    } else {
        Verdict::InsufficientScope { missing }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyId;
    use crate::record::RECORD_VERSION;
    use crate::scope::ScopePolicy;

    const NOW: UnixMillis = UnixMillis(1_000_000);

    fn record(revoked: bool, expires_at: Option<i64>, scopes: &[&str]) -> KeyRecord {
        KeyRecord {
            v: RECORD_VERSION,
            id: KeyId::parse("key_0123456789abcdefABCD").expect("valid"),
            subject: "acme".into(),
            scopes: ScopePolicy {
                wildcards: true,
                catalogue: None,
            }
            .parse_grants(scopes)
            .expect("valid"),
            revoked,
            revoked_at: revoked.then_some(UnixMillis(500)),
            expires_at: expires_at.map(UnixMillis),
            revision: 1,
            disabled: false,
            allowed_ips: Default::default(),
        }
    }

    fn disabled(record: KeyRecord) -> KeyRecord {
        KeyRecord {
            disabled: true,
            ..record
        }
    }

    fn scopes(s: &[&str]) -> Vec<Scope> {
        s.iter().map(|s| Scope::parse(s).expect("valid")).collect()
    }

    #[test]
    fn decision_table() {
        let cases: Vec<(Option<KeyRecord>, Vec<Scope>, &str)> = vec![
            (None, vec![], "NOT_FOUND"),
            (Some(record(false, None, &["read:orders"])), vec![], "VALID"),
            (
                Some(record(false, None, &["read:orders"])),
                scopes(&["read:orders"]),
                "VALID",
            ),
            (
                Some(record(false, None, &["read:*"])),
                scopes(&["read:orders"]),
                "VALID",
            ),
            (
                Some(record(false, None, &["read:orders"])),
                scopes(&["write:orders"]),
                "INSUFFICIENT_SCOPE",
            ),
            (Some(record(false, Some(NOW.0 + 1), &[])), vec![], "VALID"),
            (Some(record(false, Some(NOW.0), &[])), vec![], "EXPIRED"),
            (
                Some(record(false, Some(NOW.0), &[])),
                scopes(&["a:b"]),
                "EXPIRED",
            ),
            (
                Some(record(true, None, &["read:orders"])),
                vec![],
                "REVOKED",
            ),
            (
                Some(record(true, Some(0), &[])),
                scopes(&["a:b"]),
                "REVOKED",
            ),
            (
                Some(disabled(record(false, None, &["read:orders"]))),
                vec![],
                "DISABLED",
            ),
            (
                Some(disabled(record(false, None, &["read:orders"]))),
                scopes(&["write:orders"]),
                "DISABLED",
            ),
            (
                Some(disabled(record(false, Some(NOW.0), &[]))),
                vec![],
                "EXPIRED",
            ),
            (Some(disabled(record(true, None, &[]))), vec![], "REVOKED"),
        ];
        for (record, required, expected) in cases {
            assert_eq!(
                decide(
                    record.as_ref(),
                    &DecisionContext::at(NOW).requiring(&required)
                )
                .code(),
                expected,
                "{record:?} {required:?}"
            );
        }
    }

    #[test]
    fn an_allowlist_admits_only_its_addresses_and_never_an_unknown_one() {
        let listed = KeyRecord {
            allowed_ips: crate::ip::IpAllowlist::parse(&["203.0.113.0/24"]).expect("valid"),
            ..record(false, None, &["read:orders"])
        };
        let at = |client: Option<&str>, required: &[Scope]| {
            let client = client.map(|c| c.parse().expect("address"));
            decide(
                Some(&listed),
                &DecisionContext::at(NOW)
                    .requiring(required)
                    .from_address(client),
            )
            .code()
        };
        let orders = scopes(&["read:orders"]);
        let admin = scopes(&["admin:all"]);
        assert_eq!(at(Some("203.0.113.9"), &orders), "VALID");
        assert_eq!(at(Some("::ffff:203.0.113.9"), &orders), "VALID");
        assert_eq!(at(Some("198.51.100.1"), &orders), "IP_NOT_ALLOWED");
        assert_eq!(
            at(None, &orders),
            "IP_NOT_ALLOWED",
            "no address: fail closed"
        );
        assert_eq!(
            at(Some("198.51.100.1"), &admin),
            "IP_NOT_ALLOWED",
            "before scopes"
        );
        assert_eq!(at(Some("203.0.113.9"), &admin), "INSUFFICIENT_SCOPE");
        let report = VerifyReport::new(&Verdict::IpNotAllowed, Some(&listed));
        assert_eq!(
            (report.id, report.scopes.len(), report.expires_at),
            (None, 0, None),
            "reported without the key's details"
        );
        let off = KeyRecord {
            disabled: true,
            ..listed.clone()
        };
        let context = DecisionContext::at(NOW).from_address(None);
        assert_eq!(decide(Some(&off), &context).code(), "DISABLED");
        // No list: the address does not matter, known or not.
        let open = record(false, None, &[]);
        assert_eq!(decide(Some(&open), &context).code(), "VALID");
    }

    #[test]
    fn insufficient_scope_names_what_is_missing() {
        let r = record(false, None, &["read:orders"]);
        let required = scopes(&["read:orders", "write:webhooks"]);
        let verdict = decide(Some(&r), &DecisionContext::at(NOW).requiring(&required));
        assert_eq!(
            verdict,
            Verdict::InsufficientScope {
                missing: scopes(&["write:webhooks"])
            }
        );
    }

    #[test]
    fn garbage_is_malformed_before_any_lookup() {
        for garbage in [
            "",
            "hello",
            "sk_live_",
            "Bearer sk_live_abc",
            "sk_live_0123456789012345678901234567890123456789",
        ] {
            assert_eq!(
                parse_presented(garbage).err(),
                Some(Verdict::Malformed),
                "{garbage}"
            );
        }
    }
}
